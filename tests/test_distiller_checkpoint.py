"""SRMDistiller's checkpoint= option: an interrupted script resumes exactly."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from srm_ext.distill import StageConfig, Trainer
from srm_ext.distill.distiller_checkpoint import teacher_digest
from srm_ext import SRMDistiller
from test_distiller import (
    QUIET, changed, make_distiller, snapshot, tiny_student, tiny_teacher, toy_loader,
)

# Three epochs with an lr step after the second: a resumed stage must restore the schedule too.
CONFIG = StageConfig(epochs=3, lr=1e-2, schedule="step", milestones=(0.5,))


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Bitwise comparisons need the same reduction order in every run."""


def global_rng_loader() -> DataLoader:
    """The toy data shuffled from torch's global RNG (no generator of its own)."""
    return DataLoader(toy_loader().dataset, batch_size=16, shuffle=True)


def sampler_generator_loader() -> DataLoader:
    """The toy data in the order of a sampler with its own generator."""
    data = toy_loader().dataset
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(3))
    return DataLoader(data, batch_size=16, sampler=sampler)


def batch_sampler_generator_loader() -> DataLoader:
    """The toy data in batches of a batch sampler over a sampler with its own generator."""
    data = toy_loader().dataset
    sampler = RandomSampler(data, generator=torch.Generator().manual_seed(3))
    return DataLoader(data, batch_sampler=BatchSampler(sampler, 16, drop_last=False))


def run_all_stages(path, make_loader=toy_loader):
    """A user's script: the three stages, each with the same checkpoint file."""
    distiller = make_distiller()
    torch.manual_seed(123)
    loader = make_loader()
    histories = {
        "dictionary": distiller.fit_dictionaries(loader, checkpoint=path, config=CONFIG, **QUIET),
        "init": distiller.fit_student(loader, checkpoint=path, config=CONFIG, **QUIET),
        "kd": distiller.fit_kd(loader, checkpoint=path, config=CONFIG, **QUIET),
    }
    return distiller, histories


def interrupt_at(monkeypatch, stage_name: str, epoch: int) -> None:
    """Make the trainer raise KeyboardInterrupt when it starts that epoch (0-based)."""
    train_epoch = Trainer._train_epoch

    def interrupted(self, stage, loader, optimizer, scaler, e):
        if stage.name == stage_name and e == epoch:
            raise KeyboardInterrupt
        return train_epoch(self, stage, loader, optimizer, scaler, e)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)


def without_times(histories):
    return {k: [{m: v for m, v in r.items() if m != "time"} for r in h] for k, h in histories.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The weights and metrics of an uninterrupted run per loader, trained once.
    run_all_stages seeds itself, so the result does not depend on test order."""
    runs = {}

    def get(make_loader):
        if make_loader not in runs:
            distiller, histories = run_all_stages(tmp_path_factory.mktemp("straight") / "run.pt", make_loader)
            runs[make_loader] = (distiller.state_dict(), without_times(histories))
        return runs[make_loader]

    return get


@pytest.mark.parametrize(
    "make_loader",
    [toy_loader, global_rng_loader, sampler_generator_loader, batch_sampler_generator_loader],
)
@pytest.mark.parametrize(
    "stage_name, epoch", [("srm-dictionary", 1), ("srm-init", 1), ("srm-kd", 2), ("srm-init", 0)]
)
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch, uninterrupted, stage_name, epoch, make_loader
):
    reference_weights, reference_histories = uninterrupted(make_loader)

    path = tmp_path / "interrupted.pt"
    with monkeypatch.context() as patch:
        interrupt_at(patch, stage_name, epoch)
        with pytest.raises(KeyboardInterrupt):
            run_all_stages(path, make_loader)
    assert path.exists()  # the epochs before the interruption are saved
    # The script again, as a new process would run it: the weights, the data
    # order and the RNG states come from the checkpoint.
    resumed, histories = run_all_stages(path, make_loader)

    assert without_times(histories) == reference_histories
    for name, value in reference_weights.items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_resuming_with_persistent_workers_warns_that_augmentation_restarts(tmp_path, monkeypatch):
    # Each epoch's fresh workers draw their seeds from the saved RNG, but
    # persistent ones carry their random state over from the last epoch.
    def persistent_loader() -> DataLoader:
        return DataLoader(toy_loader().dataset, batch_size=32, num_workers=1, persistent_workers=True)

    path = tmp_path / "run.pt"
    with monkeypatch.context() as patch:
        interrupt_at(patch, "srm-dictionary", 1)
        with pytest.raises(KeyboardInterrupt):
            run_all_stages(path, persistent_loader)
    with pytest.warns(UserWarning, match="persistent workers: their random state is not saved"):
        make_distiller().fit_dictionaries(
            persistent_loader(), checkpoint=path, config=CONFIG, **QUIET
        )


def test_a_finished_stage_is_skipped_with_its_weights_and_metrics(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    trained = make_distiller()
    history = trained.fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(Trainer, "_train_epoch", no_training)
    fresh = make_distiller()
    assert fresh.fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET) == history
    for name, value in trained.representations.state_dict().items():
        assert torch.equal(fresh.representations.state_dict()[name], value)


def test_other_stage_settings_are_refused_by_name(tmp_path):
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    with pytest.raises(ValueError, match=r"stage 'dictionary' was checkpointed with other settings \(lr=0.01 -> 0.001\)"):
        make_distiller().fit_dictionaries(
            toy_loader(), checkpoint=path, config=CONFIG.replace(lr=1e-3), **QUIET
        )


def test_other_trainer_settings_are_refused_by_name(tmp_path):
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    changed = r"other settings \(trainer accumulate_steps=1 -> 2, trainer max_grad_norm=None -> 1.0\)"
    with pytest.raises(ValueError, match=changed):
        make_distiller().fit_dictionaries(
            toy_loader(), checkpoint=path, config=CONFIG, accumulate_steps=2, max_grad_norm=1.0,
            **QUIET,
        )


FIT = {"dictionary": "fit_dictionaries", "init": "fit_student", "kd": "fit_kd"}


@pytest.mark.filterwarnings("ignore:fit_student before fit_dictionaries")
@pytest.mark.parametrize(
    "stage, setting, value, change",
    [
        ("init", "local_weight", 0.5, "distiller local_weight=[1.0, 1.0] -> [0.5, 0.5]"),
        ("init", "global_weight", 0.0, "distiller global_weight=[1.0, 1.0] -> [0.0, 0.0]"),
        ("kd", "kd_alpha", 0.5, "distiller kd_alpha=0.9 -> 0.5"),
        ("kd", "kd_temperature", 2.0, "distiller kd_temperature=4.0 -> 2.0"),
    ],
)
def test_other_distiller_settings_of_a_stage_are_refused_by_name(tmp_path, stage, setting, value, change):
    # They change what the stage computes but not the weights' shapes: a
    # resume would have continued, or skipped the finished stage, under them.
    path = tmp_path / "run.pt"
    getattr(make_distiller(), FIT[stage])(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    message = f"stage '{stage}' was checkpointed with other settings ({change})"
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(make_distiller(**{setting: value}), FIT[stage])(
            toy_loader(), checkpoint=path, config=CONFIG, **QUIET
        )


@pytest.mark.parametrize("stage", ["dictionary", "init", "kd"])
def test_other_layer_pairs_of_the_same_shapes_are_refused_by_name(tmp_path, stage):
    # Same channel counts, so the weights would load without a complaint.
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    other = make_distiller(pairs={"block1": "stage1", "block2": "stage2.2"})
    before = snapshot(other)
    message = (
        "run.pt was written for the layer pairs block1 -> stage1, block2.layer1 -> stage2.1, "
        "this distiller pairs block1 -> stage1, block2 -> stage2.2"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(other, FIT[stage])(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    assert not changed(before, other)


def test_a_layer_pair_named_by_another_path_to_its_module_resumes(tmp_path):
    # An alias (or a compile wrapper's _orig_mod.) names the same module.
    def distiller(teacher_path):
        torch.manual_seed(0)
        teacher = tiny_teacher()
        teacher.first_block = teacher.block1
        return SRMDistiller(teacher, tiny_student(), {teacher_path: "stage1"}, input_shape=(1, 8, 8))

    path = tmp_path / "run.pt"
    history = distiller("block1").fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    again = distiller("first_block").fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    assert again == history


@pytest.mark.parametrize("stage", ["dictionary", "init", "kd"])
def test_another_k_is_refused_by_every_later_stage(tmp_path, stage):
    # Stage 1 fitted the dictionaries keeping k codewords: stage 2's labels
    # under another k would come from dictionaries fitted for something else.
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    message = "run.pt was written with k=[1, 1] codewords kept per pixel, this distiller keeps k=[4, 4]"
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(make_distiller(sparsity_multiplier=0.2), FIT[stage])(
            toy_loader(), checkpoint=path, config=CONFIG, **QUIET
        )


def test_a_checkpoint_without_the_layout_checks_k_per_stage(tmp_path):
    # Files written before the layout was saved still hold each stage's k.
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    state = torch.load(path, weights_only=True)
    del state["layout"]
    torch.save(state, path)
    message = "stage 'dictionary' was checkpointed with other settings (distiller sparsity=[1, 1] -> [4, 4])"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_distiller(sparsity_multiplier=0.2).fit_dictionaries(
            toy_loader(), checkpoint=path, config=CONFIG, **QUIET
        )


def test_a_stage_resumed_without_a_config_keeps_the_one_it_was_saved_with(tmp_path, monkeypatch):
    # Files of a version whose defaults differed still resume (and skip a
    # finished stage) when no config is given; a given one is still checked.
    path = tmp_path / "run.pt"
    older_defaults = StageConfig(epochs=2, weight_decay=0.0, milestones=(0.15, 0.65))
    history = make_distiller().fit_dictionaries(toy_loader(), checkpoint=path,
                                                config=older_defaults, **QUIET)
    with pytest.raises(ValueError, match=re.escape("milestones=(0.15, 0.65) -> (0.1, 0.7)")):
        make_distiller().fit_dictionaries(
            toy_loader(), checkpoint=path, config={"epochs": 2}, **QUIET
        )
    monkeypatch.setattr(Trainer, "_train_epoch", lambda *a: pytest.fail("stage 1 trained again"))
    assert make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, **QUIET) == history


def test_settings_a_stage_does_not_read_do_not_stop_its_resume(tmp_path, monkeypatch):
    # KD's alpha and temperature leave stage 1 as it was: its finished run is reused.
    path = tmp_path / "run.pt"
    history = make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    monkeypatch.setattr(Trainer, "_train_epoch", lambda *a: pytest.fail("stage 1 trained again"))
    again = make_distiller(kd_alpha=0.5, kd_temperature=2.0)
    assert again.fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET) == history


@pytest.mark.parametrize(
    "distiller_settings, config, message",
    [
        ({}, CONFIG.replace(lr=1e-3), "checkpointed with other settings (lr=0.01 -> 0.001)"),
        ({"sparsity_multiplier": 0.2}, CONFIG, "written with k=[1, 1] codewords kept per pixel"),
        ({"codeword_multiplier": 4.0}, CONFIG, "other shapes ['representations.0.dictionary (12, 24) -> (12, 48)'"),
    ],
    ids=["stage settings", "distiller settings", "block shapes"],
)
def test_a_refused_resume_leaves_the_distiller_as_it_was(tmp_path, distiller_settings, config, message):
    # Following the message's advice, a new path, must start from these
    # weights, not the checkpoint's.
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), checkpoint=path, config=CONFIG, **QUIET)
    fresh = make_distiller(**distiller_settings)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=re.escape(message)):
        fresh.fit_dictionaries(toy_loader(), checkpoint=path, config=config, **QUIET)
    assert not changed(before, fresh) and fresh.state_dict().keys() == before.keys()
    assert fresh._dictionaries_untrained()


def test_a_checkpoint_of_other_models_or_another_file_is_refused(tmp_path):
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)
    other = make_distiller(pairs={"block1": "stage1"})
    with pytest.raises(ValueError, match="written for the layer pairs"):
        other.fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)

    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="weights.pt is not an SRMDistiller checkpoint"):
        make_distiller().fit_dictionaries(toy_loader(), epochs=1, checkpoint=foreign, **QUIET)


def test_the_file_holds_a_digest_of_the_teacher_instead_of_its_weights(tmp_path):
    path = tmp_path / "run.pt"
    distiller = make_distiller()
    distiller.fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)
    saved = torch.load(path, weights_only=True)
    assert saved["teacher"] == teacher_digest(distiller.teacher)
    assert not [name for name in saved["model"] if name.startswith("teacher.")]
    assert set(saved["model"]) == {
        name for name in distiller.state_dict() if not name.startswith("teacher.")
    }


def test_another_teacher_is_refused_by_name(tmp_path):
    path = tmp_path / "run.pt"
    make_distiller().fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)
    other = make_distiller()
    with torch.no_grad():
        next(other.teacher.parameters()).view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match="run.pt was written with another teacher"):
        other.fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)
    # The teacher's buffers count too (a BatchNorm's running statistics).
    other = make_distiller()
    next(other.teacher.buffers()).view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match="run.pt was written with another teacher"):
        other.fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)


def test_a_checkpoint_in_the_earlier_format_is_refused_by_name(tmp_path):
    path = tmp_path / "old.pt"
    make_distiller().fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "format": "srm_ext.SRMDistiller.v1"}, path)
    with pytest.raises(ValueError, match="old.pt was written by an earlier srm_ext"):
        make_distiller().fit_dictionaries(toy_loader(), epochs=1, checkpoint=path, **QUIET)
