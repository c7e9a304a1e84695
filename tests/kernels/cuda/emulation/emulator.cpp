// The fiber scheduler of the host emulation (mmloss_emulation.h). A CTA's threads are
// ucontext fibers on one OS thread; a fiber runs until it waits at a barrier (block or warp)
// or exits, and a barrier opens once every live thread it spans waits at it. Divergent
// barriers (a deadlock on the GPU) and warp collectives with exited lanes end the launch.
#include <ucontext.h>

#include <memory>
#include <string>
#include <vector>

#include "mmloss_emulation.h"

namespace mmloss_emulation {
namespace {

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone, kFailed };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state;
};

constexpr size_t kStackBytes = 256 << 10;

struct Scheduler {
  ucontext_t home;
  std::vector<Fiber> fibers;
  std::vector<WarpExchange> warps;
  const std::function<void()>* body = nullptr;
  int current = -1;
  bool reverse = false;
  std::string error;
  cudaError_t last_error = cudaSuccess;
  std::string last_message;
};

Scheduler& scheduler() {
  static Scheduler s;
  return s;
}

void fiber_main() {
  Scheduler& s = scheduler();
  (*s.body)();
  s.fibers[s.current].state = State::kDone;
}  // uc_link returns to the scheduler

void wait(State state) {
  Scheduler& s = scheduler();
  s.fibers[s.current].state = state;
  swapcontext(&s.fibers[s.current].context, &s.home);
}

void resume(int t) {
  Scheduler& s = scheduler();
  s.current = t;
  threadIdx = dim3(t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y));
  swapcontext(&s.home, &s.fibers[t].context);
}

// Opens the barriers every live thread has reached; false when none can open (deadlock).
bool open_barriers(int threads) {
  Scheduler& s = scheduler();
  bool opened = false;
  for (int w0 = 0; w0 < threads; w0 += 32) {
    int waiting = 0, done = 0;
    for (int t = w0; t < w0 + 32 && t < threads; ++t) {
      waiting += s.fibers[t].state == State::kAtWarpBarrier;
      done += s.fibers[t].state == State::kDone;
    }
    if (waiting == 0 || waiting + done < 32) continue;
    if (done > 0) {
      fail("a warp collective with exited lanes");
      return true;
    }
    for (int t = w0; t < w0 + 32; ++t) s.fibers[t].state = State::kReady;
    opened = true;
  }
  if (opened) return true;
  bool all_at_block = true;
  for (int t = 0; t < threads; ++t)
    all_at_block = all_at_block && (s.fibers[t].state == State::kAtBlockBarrier || s.fibers[t].state == State::kDone);
  if (!all_at_block) return false;
  for (int t = 0; t < threads; ++t)
    if (s.fibers[t].state == State::kAtBlockBarrier) s.fibers[t].state = State::kReady;
  return true;
}

void run_block(int threads) {
  Scheduler& s = scheduler();
  for (int t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    if (!f.stack) f.stack = std::make_unique<char[]>(kStackBytes);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &s.home;
    makecontext(&f.context, fiber_main, 0);
    f.state = State::kReady;
  }
  while (s.error.empty()) {
    int live = 0;
    for (int k = 0; k < threads && s.error.empty(); ++k) {
      const int t = s.reverse ? threads - 1 - k : k;
      if (s.fibers[t].state == State::kReady) resume(t);
      live += s.fibers[t].state != State::kDone;
    }
    if (live == 0 || !s.error.empty()) return;
    if (!open_barriers(threads)) fail("deadlock: threads wait at different barriers");
  }
}

bool valid(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return grid.x >= 1 && grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
         grid.z <= 65535 && threads >= 1 && threads <= 1024 && block.z <= 64 && smem <= 48 * 1024;
}

}  // namespace

void fail(const char* what) {
  Scheduler& s = scheduler();
  if (s.error.empty())
    s.error = std::string(what) + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
              ", thread " + std::to_string(threadIdx.x) + ")";
  if (s.current >= 0 && s.fibers[s.current].state == State::kReady) wait(State::kFailed);  // never resumed
}

void block_barrier() { wait(State::kAtBlockBarrier); }
void warp_barrier() { wait(State::kAtWarpBarrier); }

WarpExchange& warp_exchange() {
  Scheduler& s = scheduler();
  return s.warps[s.current / 32];
}

int lane_id() { return scheduler().current % 32; }

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& thread_body) {
  Scheduler& s = scheduler();
  if (!valid(grid, block, smem)) {
    s.last_error = cudaErrorInvalidConfiguration;
    s.last_message = "invalid launch configuration";
    return;
  }
  const int threads = int(block.x * block.y * block.z);
  if (int(s.fibers.size()) < threads) s.fibers.resize(threads);
  s.warps.resize((threads + 31) / 32);
  s.body = &thread_body;
  gridDim = grid;
  blockDim = block;
  for (unsigned z = 0; z < grid.z && s.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && s.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) {
        blockIdx = dim3(x, y, z);
        run_block(threads);
      }
  s.current = -1;
  if (!s.error.empty()) {
    s.last_error = cudaErrorLaunchFailure;
    s.last_message = s.error;
    s.error.clear();
  }
}

cudaError_t take_last_error() {
  Scheduler& s = scheduler();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

const char* last_message() { return scheduler().last_message.c_str(); }

void set_reverse_order(bool reverse) { scheduler().reverse = reverse; }

}  // namespace mmloss_emulation
