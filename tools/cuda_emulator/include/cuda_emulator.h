// A CUDA execution model on the CPU, for checking kernel logic where no GPU
// is present. Kernels are compiled as plain C++ (translate.py rewrites the
// launch syntax and shared-memory declarations) and run block by block: each
// thread of a block is a fiber on one OS thread, and every synchronising
// primitive (__syncthreads, __syncwarp, shuffles, ballots, wmma) is a point
// where the fiber waits for the threads it synchronises with.
//
// What it checks besides the results:
//   * barrier misuse: a __syncthreads or full-warp primitive that not every
//     thread of the block (warp) reaches, or reaches after others exited,
//     is reported instead of hanging; so are threads of a block waiting at
//     different __syncthreads calls, and lanes of a warp meeting at
//     different kinds of collective (a shuffle in some, a ballot in others);
//   * missing barriers: between two synchronisation points the threads run
//     in an order chosen by the schedule (forward, reverse, or shuffled), so
//     a read that relies on another thread's unsynchronised write sees the
//     poisoned memory or stale data under one of the schedules. Those
//     schedules let no warp get more than a synchronisation point or two
//     ahead of the others (a warp collective is two); the warp-serial one
//     runs each warp alone up to its next __syncthreads, which exposes a
//     warp reading another warp's write after collectives of its own. The
//     blocks of a grid run in the schedule's order too;
//   * uninitialised shared memory: static and dynamic shared memory is
//     filled before every block with 0xff bytes (NaN floats, -1 integers),
//     or under the reverse schedule, and in every other block of a
//     shuffled (or warp-serial) one, with 0x7f bytes (3.4e38 floats, huge
//     positive integers): -1 is also how kernels mark an absent pixel or
//     codeword, which a read of memory never written must not pass for
//     under every schedule;
//   * global memory outside a buffer: a buffer from fenced_alloc (the
//     tests' tensors) lies against an inaccessible page after its end (or
//     before its start), so that an access past it faults and fails the
//     thread, as an illegal address does on a GPU; a fault at any other
//     address inside a kernel is reported the same way;
//   * dynamic shared memory past the launch's size: it lies against an
//     inaccessible page too, so that an access past it faults;
//   * launch configuration: block and grid limits, a block larger than the
//     kernel's __launch_bounds__ (translate.py turns the bound into a check
//     at the top of the kernel), and dynamic shared memory past 48 KiB
//     without cudaFuncAttributeMaxDynamicSharedMemorySize.
// It does not model timing, warp lockstep, or global-memory races.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <new>
#include <numeric>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda_runtime_api.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};

// Vector types with CUDA's alignment (kernels load shared memory through them).
struct alignas(8) float2 {
  float x, y;
};

struct alignas(16) float4 {
  float x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

struct alignas(16) int4 {
  int x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace cuda_emulator {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultDynamicSharedBytes = 48 * 1024;
constexpr size_t kFiberStackBytes = 256 * 1024;

enum class Waiting { kRunnable, kBlockBarrier, kWarpBarrier, kExited };

struct Fiber {
  ucontext_t context{};
  char* stack = nullptr;  // kFiberStackBytes, owned by State::stacks
  uint3 thread{0, 0, 0};
  int linear = 0;
  Waiting waiting = Waiting::kRunnable;
  uint64_t generation = 0;
};

struct BlockRun {
  std::vector<Fiber> fibers;
  ucontext_t scheduler{};
  int current = -1;
  int exited = 0;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  std::source_location block_barrier;  // where the waiting threads called it
  std::vector<int> warp_arrived;
  std::vector<uint64_t> warp_generation;
  std::vector<const char*> warp_primitive;  // what the waiting lanes called
  std::vector<uint64_t> exchange;  // one 64-bit slot per thread
  const std::function<void()>* body = nullptr;
  // Shared memory of the launch: its dynamic bytes, the dynamic limit it was
  // allowed (0 when never raised) and the static arrays its threads declared.
  size_t dynamic_shared_bytes = 0;
  size_t dynamic_shared_limit = 0;
  std::map<void*, size_t> static_shared;
  std::string failure;
  cudaError_t failure_error = cudaErrorLaunchFailure;
  unsigned char poison = 0xff;  // the block's fill of its shared memory
};

inline BlockRun& current_run(const char* what) {
  BlockRun* run = state().run;
  if (run == nullptr || run->current < 0) {
    throw std::logic_error(std::string(what) + " called outside a kernel");
  }
  return *run;
}

// Reports a failure of the running thread and abandons its block: no thread
// of it runs again (their locals are never destroyed; failures end a test).
[[noreturn]] inline void fail(const std::string& message,
                              cudaError_t error = cudaErrorLaunchFailure) {
  BlockRun& run = *state().run;
  if (run.failure.empty()) {
    run.failure = message;
    run.failure_error = error;
  }
  Fiber& self = run.fibers[run.current];
  self.waiting = Waiting::kExited;
  swapcontext(&self.context, &run.scheduler);
  __builtin_unreachable();  // a failed block is never resumed
}

// First statement of a kernel declared with __launch_bounds__(max_threads,
// ...): a GPU refuses to launch it with a larger block, so the launch fails
// before any thread has done anything.
inline void check_launch_bounds(long long max_threads) {
  const unsigned long long threads =
      static_cast<unsigned long long>(blockDim.x) * blockDim.y * blockDim.z;
  if (threads > static_cast<unsigned long long>(max_threads)) {
    fail(std::to_string(threads) + " threads per block, past the kernel's __launch_bounds__ of " +
             std::to_string(max_threads),
         cudaErrorLaunchOutOfResources);
  }
}

inline std::string where(const BlockRun& run) {
  const Fiber& f = run.fibers[run.current];
  return " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
         ", thread " + std::to_string(f.linear) + ")";
}

// Memory between two inaccessible pages, its bytes placed against the back
// one (or with at_start, the front one): a kernel reading or writing past
// that end faults, as a GPU's access outside its allocation does (and
// compute-sanitizer names), where an ordinary host buffer would hand it a
// neighbour's bytes. The rest of the pages between (the other side, and the
// bytes up to `align` past the end) hold 0xff, which reads as NaN or -1 and
// which fenced_intact checks.
struct Fenced {
  char* base;
  size_t mapped;
  size_t bytes;
  const char* what;
};

inline std::map<char*, Fenced>& fenced_blocks() {
  static std::map<char*, Fenced> blocks;  // by data address
  return blocks;
}

inline size_t page_bytes() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

inline void install_fault_handler();

inline void* fenced_alloc(size_t bytes, size_t align, const char* what, bool at_start = false) {
  install_fault_handler();
  const size_t page = page_bytes();
  const size_t padded = (bytes + align - 1) / align * align;
  const size_t pages = std::max<size_t>(1, (padded + page - 1) / page);
  const size_t mapped = (pages + 2) * page;
  void* mapping = mmap(nullptr, mapped, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) throw std::bad_alloc();
  char* base = static_cast<char*>(mapping);
  if (mprotect(base + page, pages * page, PROT_READ | PROT_WRITE) != 0) {
    munmap(mapping, mapped);
    throw std::bad_alloc();
  }
  std::memset(base + page, 0xff, pages * page);
  char* data = at_start ? base + page : base + (pages + 1) * page - padded;
  fenced_blocks()[data] = Fenced{base, mapped, bytes, what};
  return data;
}

inline void fenced_free(void* data) {
  auto it = fenced_blocks().find(static_cast<char*>(data));
  if (it == fenced_blocks().end()) return;
  munmap(it->second.base, it->second.mapped);
  fenced_blocks().erase(it);
}

// Whether the poisoned bytes around a fenced block's data are untouched.
inline bool fenced_intact(const void* data) {
  const auto it = fenced_blocks().find(static_cast<char*>(const_cast<void*>(data)));
  if (it == fenced_blocks().end()) return true;
  const Fenced& f = it->second;
  const char* start = it->first;
  const auto poisoned = [](const char* from, const char* to) {
    for (; from < to; ++from) {
      if (static_cast<unsigned char>(*from) != 0xff) return false;
    }
    return true;
  };
  const size_t page = page_bytes();
  return poisoned(f.base + page, start) &&
         poisoned(start + f.bytes, f.base + f.mapped - page);
}

// What a faulting address is, for the report: where it lies against the
// nearest fenced block, if any is within a page of it.
inline std::string describe_address(const void* address) {
  const char* a = static_cast<const char*>(address);
  char hex[32];
  std::snprintf(hex, sizeof(hex), "%p", address);
  for (const auto& [data, f] : fenced_blocks()) {
    if (a >= f.base && a < f.base + f.mapped) {
      const std::string size = " of a " + std::to_string(f.bytes) + "-byte " + f.what;
      if (a >= data) {
        return std::string(hex) + ", " + std::to_string(a - (data + f.bytes)) +
               " bytes past the end" + size;
      }
      return std::string(hex) + ", " + std::to_string(data - a) + " bytes before the start" + size;
    }
  }
  return hex;
}

inline struct sigaction& previous_fault_action() {
  static struct sigaction action;
  return action;
}

// A fault in an emulated thread fails its block, as an illegal address does
// on a GPU; any other fault goes to the handler that was there before.
inline void on_fault(int, siginfo_t* info, void*) {
  BlockRun* run = state().run;
  if (run == nullptr || run->current < 0) {
    sigaction(SIGSEGV, &previous_fault_action(), nullptr);  // the access faults again there
    return;
  }
  fail("illegal address " + describe_address(info->si_addr) + where(*run),
       cudaErrorIllegalAddress);
}

inline void install_fault_handler() {
  static const bool installed = [] {
    struct sigaction action {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGSEGV, &action, &previous_fault_action()) == 0;
  }();
  (void)installed;
}

// reinterpret_cast<Pointer>(p) for a pointer to a CUDA vector type, which
// translate.py puts in place of such casts: a GPU's wide load or store
// faults on an address that is not a multiple of the vector's size, so the
// kernel fails here too.
template <typename Pointer, typename From>
Pointer vector_cast(From* p) {
  using Vector = std::remove_cv_t<std::remove_pointer_t<Pointer>>;
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(Vector) != 0) {
    const std::string message = "misaligned address: a " + std::to_string(sizeof(Vector)) +
                                "-byte vector access " +
                                std::to_string(reinterpret_cast<std::uintptr_t>(p) % alignof(Vector)) +
                                " bytes past its alignment";
    BlockRun* run = state().run;
    if (run == nullptr || run->current < 0) {
      throw std::logic_error(message);
    }
    fail(message + where(*run), cudaErrorMisalignedAddress);
  }
  return reinterpret_cast<Pointer>(p);
}

inline void yield(BlockRun& run) {
  Fiber& self = run.fibers[run.current];
  swapcontext(&self.context, &run.scheduler);
}

inline int warp_of(int linear) { return linear / kWarpSize; }

inline int warp_threads(const BlockRun& run, int warp) {
  const int total = static_cast<int>(run.fibers.size());
  return std::min(kWarpSize, total - warp * kWarpSize);
}

inline std::string describe(const std::source_location& site) {
  return std::string(site.file_name()) + ":" + std::to_string(site.line()) + ":" +
         std::to_string(site.column());
}

inline void sync_block(const std::source_location& site) {
  BlockRun& run = current_run("__syncthreads");
  if (run.exited > 0) {
    fail("__syncthreads reached after " + std::to_string(run.exited) +
         " threads of the block exited" + where(run));
  }
  // Threads waiting at one __syncthreads are not released by another: a
  // barrier in code that diverges across the block is undefined on a GPU
  // (it may hang, or pair up the wrong phases), not a barrier that holds.
  if (run.block_arrived == 0) {
    run.block_barrier = site;
  } else if (site.line() != run.block_barrier.line() ||
             site.column() != run.block_barrier.column() ||
             std::strcmp(site.file_name(), run.block_barrier.file_name()) != 0) {
    fail("__syncthreads at " + describe(site) + " reached while other threads of the block wait at " +
         describe(run.block_barrier) + where(run));
  }
  Fiber& self = run.fibers[run.current];
  const int total = static_cast<int>(run.fibers.size());
  if (++run.block_arrived == total) {
    run.block_arrived = 0;
    ++run.block_generation;
    return;
  }
  self.waiting = Waiting::kBlockBarrier;
  self.generation = run.block_generation;
  yield(run);
  self.waiting = Waiting::kRunnable;
}

inline void sync_warp(unsigned mask, const char* what) {
  BlockRun& run = current_run(what);
  Fiber& self = run.fibers[run.current];
  const int warp = warp_of(self.linear);
  const int lanes = warp_threads(run, warp);
  const unsigned full = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) {
    fail(std::string(what) + ": only full-warp masks are modelled" + where(run));
  }
  for (int lane = 0; lane < lanes; ++lane) {
    if (run.fibers[warp * kWarpSize + lane].waiting == Waiting::kExited) {
      fail(std::string(what) + " with lane " + std::to_string(lane) +
           " of the warp exited" + where(run));
    }
  }
  // Lanes meet only at the same kind of collective (a shuffle mode, a
  // ballot, __syncwarp): a GPU does not pair a shuffle in one lane with a
  // ballot or a __syncwarp in another, and what each gets is undefined.
  if (run.warp_arrived[warp] == 0) {
    run.warp_primitive[warp] = what;
  } else if (std::strcmp(run.warp_primitive[warp], what) != 0) {
    fail(std::string(what) + " reached while other lanes of the warp wait at " +
         run.warp_primitive[warp] + where(run));
  }
  if (++run.warp_arrived[warp] == lanes) {
    run.warp_arrived[warp] = 0;
    ++run.warp_generation[warp];
    return;
  }
  self.waiting = Waiting::kWarpBarrier;
  self.generation = run.warp_generation[warp];
  yield(run);
  self.waiting = Waiting::kRunnable;
}

// Every lane publishes 64 bits, the warp synchronises, `read(slots of the
// warp)` runs in every lane, and the warp synchronises again so that the
// slots may be reused.
template <typename Read>
auto warp_exchange(unsigned mask, uint64_t mine, const char* what, Read&& read) {
  BlockRun& run = current_run(what);
  const int linear = run.fibers[run.current].linear;
  const int base = warp_of(linear) * kWarpSize;
  run.exchange[linear] = mine;
  sync_warp(mask, what);
  auto result = read(run.exchange.data() + base, linear - base, warp_threads(run, base / kWarpSize));
  sync_warp(mask, what);
  return result;
}

// Called by every thread at a __shared__ declaration. The first call poisons
// the array (no thread can have used it yet); run_block poisons it again
// before every later block.
//
// A GPU gives a block at most 48 KiB of static and dynamic shared memory
// together unless the kernel's dynamic limit was raised, and then at most the
// opt-in size: static arrays count against both, so a launch whose total
// passes its limit fails at the first declaration that takes it there.
inline void track_shared(void* address, size_t bytes) {
  State& s = state();
  BlockRun& run = current_run("__shared__");
  if (s.shared_regions.emplace(address, bytes).second) {
    std::memset(address, run.poison, bytes);
  }
  if (!run.static_shared.emplace(address, bytes).second) {
    return;
  }
  size_t static_bytes = 0;
  for (const auto& region : run.static_shared) {
    static_bytes += region.second;
  }
  const size_t limit = run.dynamic_shared_limit > 0
                           ? static_cast<size_t>(kOptInSharedBytes)
                           : kDefaultDynamicSharedBytes;
  const size_t dynamic = std::max(run.dynamic_shared_bytes, run.dynamic_shared_limit);
  if (static_bytes + dynamic > limit) {
    fail(std::to_string(static_bytes) + " bytes of static shared memory and " +
             std::to_string(dynamic) + " of dynamic pass the block's " +
             std::to_string(limit) + " bytes",
         cudaErrorInvalidValue);
  }
}

inline void* dynamic_shared_memory() { return state().dynamic_shared; }

// GPUs align dynamic shared memory to at least 16 bytes.
constexpr size_t kDynamicSharedAlign = 16;

// Fails the running thread if it wrote into the bytes between the end of the
// dynamic shared memory and the inaccessible page (it is rounded up to
// kDynamicSharedAlign), which no fault catches.
inline void check_dynamic_shared_tail(BlockRun& run) {
  const State& s = state();
  const size_t bytes = s.dynamic_shared_bytes;
  const size_t padded = (bytes + kDynamicSharedAlign - 1) / kDynamicSharedAlign * kDynamicSharedAlign;
  for (size_t i = bytes; i < padded; ++i) {
    if (s.dynamic_shared[i] != 0xff) {
      run.failure = "wrote past the end of " + std::to_string(bytes) +
                    " bytes of dynamic shared memory (its byte " + std::to_string(i) + ")" +
                    where(run);
      return;
    }
  }
}

inline void fiber_entry() {
  BlockRun& run = *state().run;
  (*run.body)();
  Fiber& self = run.fibers[run.current];
  self.waiting = Waiting::kExited;
  ++run.exited;
  swapcontext(&self.context, &run.scheduler);
}

// Runs thread i of the block to its next synchronisation point (or its
// exit) unless it waits at a barrier not yet released; returns whether it ran.
inline bool resume_thread(BlockRun& run, int i) {
  Fiber& f = run.fibers[i];
  if (f.waiting == Waiting::kExited) return false;
  if (f.waiting == Waiting::kBlockBarrier && f.generation == run.block_generation) return false;
  if (f.waiting == Waiting::kWarpBarrier &&
      f.generation == run.warp_generation[warp_of(f.linear)]) {
    return false;
  }
  run.current = i;
  threadIdx = f.thread;
  swapcontext(&run.scheduler, &f.context);
  if (run.failure.empty()) check_dynamic_shared_tail(run);
  run.current = -1;
  return true;
}

// Runs one block to completion; returns false (with run.failure set) when a
// thread failed or the block deadlocked.
inline bool run_block(BlockRun& run, std::mt19937_64& rng) {
  State& s = state();
  const int total = static_cast<int>(run.fibers.size());
  for (auto& [address, bytes] : s.shared_regions) {
    std::memset(address, run.poison, bytes);
  }
  std::memset(s.dynamic_shared, run.poison, s.dynamic_shared_bytes);
  for (int i = 0; i < total; ++i) {
    Fiber& f = run.fibers[i];
    f.waiting = Waiting::kRunnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kFiberStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::fill(run.warp_arrived.begin(), run.warp_arrived.end(), 0);
  run.exited = 0;
  run.block_arrived = 0;
  std::vector<int> order(total);
  std::iota(order.begin(), order.end(), 0);
  if (s.schedule == kReverse) {
    std::reverse(order.begin(), order.end());
  }
  std::vector<int> warps((total + kWarpSize - 1) / kWarpSize);
  std::iota(warps.begin(), warps.end(), 0);
  while (run.exited < total) {
    bool progressed = false;
    if (s.schedule == kWarpSerial) {
      // Each warp alone, in a shuffled order, until every lane waits at
      // __syncthreads or has exited: a warp runs as far ahead of the others
      // as a GPU may let it.
      std::shuffle(warps.begin(), warps.end(), rng);
      for (int w : warps) {
        const int end = std::min(total, (w + 1) * kWarpSize);
        for (bool ran = true; ran;) {
          ran = false;
          for (int i = w * kWarpSize; i < end; ++i) {
            if (resume_thread(run, i)) {
              ran = progressed = true;
              if (!run.failure.empty()) return false;
            }
          }
        }
      }
    } else {
      if (s.schedule == kShuffled) {
        std::shuffle(order.begin(), order.end(), rng);
      }
      for (int i : order) {
        if (resume_thread(run, i)) {
          progressed = true;
          if (!run.failure.empty()) return false;
        }
      }
    }
    if (!progressed) {
      int at_block = 0, at_warp = 0;
      for (const Fiber& f : run.fibers) {
        at_block += f.waiting == Waiting::kBlockBarrier;
        at_warp += f.waiting == Waiting::kWarpBarrier;
      }
      run.failure = "deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads, " +
                    std::to_string(at_warp) + " at a warp barrier, " +
                    std::to_string(run.exited) + " exited (block " +
                    std::to_string(blockIdx.x) + ")";
      return false;
    }
  }
  return true;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  LaunchConfig(dim3 g, dim3 b, size_t bytes = 0, cudaStream_t = nullptr)
      : grid(g), block(b), shared_bytes(bytes) {}
};

inline void record_error(cudaError_t error, const std::string& message) {
  State& s = state();
  if (s.last_error == cudaSuccess) s.last_error = error;
  if (s.failure.empty()) s.failure = message;
}

inline void run_grid(const void* kernel, const LaunchConfig& config,
                     const std::function<void()>& body) {
  State& s = state();
  const dim3 g = config.grid, b = config.block;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) {
    record_error(cudaErrorInvalidConfiguration, "invalid launch configuration");
    return;
  }
  if (config.shared_bytes > kDefaultDynamicSharedBytes) {
    auto it = s.dynamic_shared_limit.find(kernel);
    if (it == s.dynamic_shared_limit.end() || it->second < config.shared_bytes) {
      record_error(cudaErrorInvalidValue,
                   std::to_string(config.shared_bytes) +
                       " bytes of dynamic shared memory without raising "
                       "cudaFuncAttributeMaxDynamicSharedMemorySize");
      return;
    }
  }
  // Against an inaccessible page, so that an access past the bytes the
  // launch asked for faults (on a GPU it leaves the block's shared memory)
  // instead of reaching what an earlier, larger launch left there.
  if (s.dynamic_shared == nullptr || s.dynamic_shared_bytes != config.shared_bytes) {
    fenced_free(s.dynamic_shared);
    s.dynamic_shared = static_cast<unsigned char*>(
        fenced_alloc(config.shared_bytes, kDynamicSharedAlign, "dynamic shared memory"));
    s.dynamic_shared_bytes = config.shared_bytes;
  }
  BlockRun run;
  run.body = &body;
  run.dynamic_shared_bytes = config.shared_bytes;
  if (auto it = s.dynamic_shared_limit.find(kernel); it != s.dynamic_shared_limit.end()) {
    run.dynamic_shared_limit = it->second;
  }
  run.fibers.resize(threads);
  // Stacks are kept across launches; left uninitialised, only the pages a
  // thread touches are ever mapped.
  while (s.stacks.size() < threads) {
    s.stacks.emplace_back(new char[kFiberStackBytes]);
  }
  for (uint64_t i = 0; i < threads; ++i) {
    Fiber& f = run.fibers[i];
    f.stack = s.stacks[i].get();
    f.linear = static_cast<int>(i);
    f.thread = {static_cast<unsigned>(i % b.x), static_cast<unsigned>((i / b.x) % b.y),
                static_cast<unsigned>(i / (uint64_t{b.x} * b.y))};
  }
  const int warps = static_cast<int>((threads + kWarpSize - 1) / kWarpSize);
  run.warp_arrived.assign(warps, 0);
  run.warp_generation.assign(warps, 0);
  run.warp_primitive.assign(warps, nullptr);
  run.exchange.assign(threads, 0);
  std::mt19937_64 rng(s.seed);
  BlockRun* outer = s.run;
  s.run = &run;
  blockDim = b;
  gridDim = g;
  // The schedule orders the blocks too: a block that reads what another
  // block of the same launch writes (no grid-wide barrier exists) sees it
  // missing under one of the orders.
  const uint64_t blocks = uint64_t{g.x} * g.y * g.z;
  std::vector<uint64_t> block_order(blocks);
  std::iota(block_order.begin(), block_order.end(), uint64_t{0});
  const bool shuffled = s.schedule == kShuffled || s.schedule == kWarpSerial;
  if (s.schedule == kReverse) {
    std::reverse(block_order.begin(), block_order.end());
  } else if (shuffled) {
    std::shuffle(block_order.begin(), block_order.end(), rng);
  }
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t linear_block = block_order[i];
    run.poison = s.schedule == kReverse || (shuffled && i % 2 == 1) ? 0x7f : 0xff;
    blockIdx = {static_cast<unsigned>(linear_block % g.x),
                static_cast<unsigned>((linear_block / g.x) % g.y),
                static_cast<unsigned>(linear_block / (uint64_t{g.x} * g.y))};
    if (!run_block(run, rng)) {
      s.run = outer;
      record_error(run.failure_error, run.failure);
      return;
    }
  }
  s.run = outer;
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) after translation.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  // Arguments are converted to the parameter types at the launch, as CUDA
  // does; every thread then gets its own copy.
  std::tuple<std::decay_t<Params>...> params(static_cast<std::decay_t<Params>>(args)...);
  const std::function<void()> body = [&]() {
    auto copy = params;
    std::apply(kernel, copy);
  };
  run_grid(reinterpret_cast<const void*>(kernel), config, body);
}

}  // namespace cuda_emulator

// ---------------------------------------------------------------------------
// Device intrinsics
// ---------------------------------------------------------------------------

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  cuda_emulator::sync_block(site);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { cuda_emulator::sync_warp(mask, "__syncwarp"); }

namespace cuda_emulator {

// A warp shuffle: every lane publishes `value` and gets that of lane
// source_of(lane), or its own where that lane does not exist.
template <typename T, typename Source>
T shuffle(unsigned mask, T value, const char* what, Source&& source_of) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "64-bit payload");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return warp_exchange(mask, bits, what, [&](const uint64_t* slots, int lane, int lanes) {
    const int source = source_of(lane);
    T out;
    const uint64_t chosen = source < lanes ? slots[source] : slots[lane];
    std::memcpy(&out, &chosen, sizeof(T));
    return out;
  });
}

}  // namespace cuda_emulator

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return cuda_emulator::shuffle(mask, value, "__shfl_xor_sync", [&](int lane) {
    return (lane ^ lane_mask) & (width - 1) | (lane & ~(width - 1));
  });
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int source_lane, int width = 32) {
  return cuda_emulator::shuffle(mask, value, "__shfl_sync", [&](int lane) {
    return (lane & ~(width - 1)) + (source_lane & (width - 1));
  });
}

// Lanes whose value has the same bits as this lane's (32-bit values).
template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "32-bit value");
  uint32_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return cuda_emulator::warp_exchange(
      mask, bits, "__match_any_sync", [](const uint64_t* slots, int lane, int lanes) {
        unsigned same = 0;
        for (int l = 0; l < lanes; ++l) same |= (slots[l] == slots[lane] ? 1u : 0u) << l;
        return same;
      });
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return cuda_emulator::warp_exchange(
      mask, predicate != 0, "__ballot_sync", [](const uint64_t* slots, int, int lanes) {
        unsigned bits = 0;
        for (int l = 0; l < lanes; ++l) bits |= (slots[l] ? 1u : 0u) << l;
        return bits;
      });
}

// The largest of the lanes' values (sm_80's redux.sync).
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  return cuda_emulator::warp_exchange(
      mask, value, "__reduce_max_sync", [](const uint64_t* slots, int, int lanes) {
        uint64_t best = 0;
        for (int l = 0; l < lanes; ++l) best = slots[l] > best ? slots[l] : best;
        return static_cast<unsigned>(best);
      });
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}

inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// A rounded product that the GPU compiler never merges into a fused
// multiply-add. Built for baseline x86-64, the emulator never fuses either.
inline float __fmul_rn(float a, float b) { return a * b; }

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}

inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}

using std::isnan;

#include "cuda_fp16.h"
#include "cuda_bf16.h"
