// ParallelFor over XLA:CPU's intra-op thread pool, shared by the compiled kernels of this folder.
#ifndef CONVNEXT_AUDIO_JAX_NATIVE_PARALLEL_H_
#define CONVNEXT_AUDIO_JAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace convnext_audio_jax {

// Runs task(0) .. task(tasks - 1) on the calling thread and the pool's threads. A helper that starts after all
// tasks were claimed returns at once; the caller waits only for tasks that were claimed, so it never waits on a
// helper the pool has not started (the caller may itself be one of the pool's threads).
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, F task) {
  struct State {
    State(F f, int64_t n) : task(std::move(f)), tasks(n) {}
    F task;
    int64_t tasks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    void Run() {
      for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
        task(t);
        if (done.fetch_add(1) + 1 == tasks) {
          std::lock_guard<std::mutex> lock(mu);
          cv.notify_all();
        }
      }
    }
  };
  if (tasks <= 0) return;
  auto state = std::make_shared<State>(std::move(task), tasks);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule([state] { state->Run(); });
  state->Run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
}

}  // namespace convnext_audio_jax

#endif  // CONVNEXT_AUDIO_JAX_NATIVE_PARALLEL_H_
