"""SRM distillation between your own teacher and student models.

Run: python examples/custom_models.py [--epochs N]
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from srm_ext import SRMDistiller
from srm_ext.distill import StageConfig, Trainer, accuracy


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_block(1, 32), conv_block(32, 64, 2), conv_block(64, 64))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_block(1, 16), conv_block(16, 32, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def main(epochs: int) -> None:
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(images[:1400], labels[:1400]), batch_size=64, shuffle=True)
    test = DataLoader(TensorDataset(images[1400:], labels[1400:]), batch_size=256)
    quiet = Trainer(progress=False, log=None)

    # 1. A teacher (normally you load a trained one).
    teacher = Teacher()
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(epochs):
        for x, y in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(teacher(x), y).backward()
            optimizer.step()
    print(f"teacher accuracy: {accuracy(teacher, test):.3f}")

    # 2. SRM: teacher module path -> student module path, as in named_modules().
    distiller = SRMDistiller(
        teacher,
        Student(),
        layer_pairs={"features.0": "body.0", "features.2": "body.1"},
        codeword_multiplier=2.0,
        sparsity_multiplier=0.02,
        input_shape=(1, 8, 8),
    )
    distiller.fit_dictionaries(train, epochs=max(1, epochs // 2), trainer=quiet)  # stage 1
    distiller.fit_student(train, epochs=max(1, epochs // 2), trainer=quiet)  # stage 2
    history = distiller.fit_kd(  # stage 3, with an explicit optimiser/schedule
        train,
        config=StageConfig(epochs=epochs, lr=1e-3, schedule="cosine"),
        eval_loader=test,
        trainer=quiet,
    )
    print(f"stage-3 loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")

    # 3. A plain Student: no SRM blocks, no hooks.
    student = distiller.export_student()
    print(f"student accuracy: {accuracy(student, test):.3f}")
    torch.save(student.state_dict(), "student.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    main(parser.parse_args().epochs)
