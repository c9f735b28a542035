// What the XLA FFI handlers of this folder share: running per-sample work on XLA's intra-op threads, and
// reading an optional operand (an empty array stands for "absent").
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace cbam_xla {

namespace ffi = xla::ffi;

// Runs body(i, i + 1) for i in [0, n) on the calling thread and up to num_threads - 1 tasks on XLA's pool,
// which claim samples from a shared counter. The caller waits only for samples already claimed: a task that
// starts late (its pool threads busy, e.g. with another custom call waiting the same way) finds none left
// and returns without touching the body, so the wait cannot deadlock and the state it reads outlives it.
template <typename Body>
void on_xla_threads(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct Shared {
    std::atomic<int64_t> next{0}, busy{0};
    std::mutex m;
    std::condition_variable done;
  };
  auto shared = std::make_shared<Shared>();
  const Body* work = &body;
  auto drain = [shared, work, n] {
    for (;;) {
      shared->busy.fetch_add(1);
      const int64_t i = shared->next.fetch_add(1);
      if (i < n) (*work)(i, i + 1);
      if (shared->busy.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(shared->m);
        shared->done.notify_all();
      }
      if (i >= n) return;
    }
  };
  const int64_t helpers = std::min<int64_t>(n, pool.num_threads()) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(drain)(drain));  // Schedule takes its own copy
  drain();
  std::unique_lock<std::mutex> lock(shared->m);
  shared->done.wait(lock, [&] { return shared->busy.load() == 0; });
}

template <typename T>
const T* data_or_null(const ffi::AnyBuffer& b) {
  return b.element_count() == 0 ? nullptr : static_cast<const T*>(b.untyped_data());
}

}  // namespace cbam_xla
