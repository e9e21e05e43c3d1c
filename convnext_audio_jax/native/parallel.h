// ParallelFor over XLA:CPU's intra-op thread pool, and Guarded, the FFI handlers' exception barrier: shared by the
// compiled kernels of this folder.
#ifndef CONVNEXT_AUDIO_JAX_NATIVE_PARALLEL_H_
#define CONVNEXT_AUDIO_JAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace convnext_audio_jax {

// Runs task(0) .. task(tasks - 1) on the calling thread and the pool's threads. A helper that starts after all
// tasks were claimed returns at once; the caller waits only for tasks that were claimed, so it never waits on a
// helper the pool has not started (the caller may itself be one of the pool's threads). An exception thrown by a
// task (std::bad_alloc of its scratch) is caught where it is thrown (on a pool thread it would end the process),
// the tasks not yet started are skipped, and the first one is rethrown here once every claimed task is done: the
// tasks reference the caller's frame, which must outlive them.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t tasks, F task) {
  struct State {
    State(F f, int64_t n) : task(std::move(f)), tasks(n) {}
    F task;
    int64_t tasks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;  // the first task's exception, under mu
    std::mutex mu;
    std::condition_variable cv;
    void Run() {
      for (int64_t t; (t = next.fetch_add(1)) < tasks;) {
        if (!failed.load()) {
          try {
            task(t);
          } catch (...) {
            std::lock_guard<std::mutex> lock(mu);
            if (!error) error = std::current_exception();
            failed.store(true);
          }
        }
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
  for (int64_t k = 0; k < helpers; ++k) {
    try {
      pool.Schedule([state] { state->Run(); });
    } catch (...) {  // no memory for another helper: the caller and the helpers already started do the rest
      break;
    }
  }
  state->Run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == tasks; });
  if (state->error) std::rethrow_exception(state->error);
}

// Guarded<Handler>::Call: the handler, with any C++ exception it lets out (std::bad_alloc of a packed copy or a
// partial sum, ...) returned as an error XLA reports to the caller; an exception leaving an FFI handler would
// terminate the process.
template <auto Handler>
struct Guarded;

template <typename... Args, xla::ffi::Error (*Handler)(Args...)>
struct Guarded<Handler> {
  static xla::ffi::Error Call(Args... args) {
    try {
      return Handler(std::move(args)...);
    } catch (const std::bad_alloc&) {
      return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                             "convnext_audio_jax native kernel: out of memory for its scratch buffers");
    } catch (const std::exception& error) {
      return xla::ffi::Error::Internal(std::string("convnext_audio_jax native kernel: ") + error.what());
    } catch (...) {
      return xla::ffi::Error::Internal("convnext_audio_jax native kernel: an unknown C++ exception");
    }
  }
};

}  // namespace convnext_audio_jax

#endif  // CONVNEXT_AUDIO_JAX_NATIVE_PARALLEL_H_
