// Fused CBAM inference for CPU: the whole block in three passes over each sample. Framework-free: the torch
// op (backends/torch/csrc/cbam_infer.cpp) and the XLA FFI handler (backends/jax/csrc/cbam_infer_ffi.cpp) wrap it.
//
// Composed torch ops stream the full tensor through memory about 8 times (pools, channel-gated copy,
// channel mean and max, spatial-gated product). Here the channel pools read every sample once, the channel
// MLP runs for the whole batch (its weights read once, not once per sample), and then each sample's maps,
// spatial gate and product run in bands of rows: the product re-reads a band the maps have just read (in L2).
// So x is read twice from beyond L2 (once from memory, once from L3 or memory) and the output written once.
//
// Same maths and rounding points as the composed path in each backend's functional.py: y = x * cg is
// rounded before the channel statistics, the output is (x * cg) * sg, BatchNorm (eval) is the affine
// map with the running statistics. Sums run in another order (vector lanes) and the pools share one
// fc2 product (fc2 is affine), so results agree to float rounding, not bit for bit.
//
// Covers: float32/float64, NCHW-contiguous or channels_last input, pools avg/max, either concat order,
// any odd kernel, optional MLP/conv biases, BatchNorm in eval mode, sigmoid or hard_sigmoid gates, an eval
// BatchNorm in front (in_scale/in_shift) and a ResNet block's shortcut add and ReLU behind (residual).
// Anything else (autograd, BN in train mode, other pools or dtypes) stays on the composed path; the
// Python side (each backend's cpu_kernel.py) decides.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "infer_simd.h"

namespace cbam_infer_core {

using namespace cbam_infer_simd;

constexpr int64_t kTile = 1024;    // spatial positions per channel-reduction tile (accumulators in L1)
constexpr int64_t kBandBytes = 128 * 1024;  // x per band of rows in the maps + product passes (L2 holds a few)
constexpr int64_t kWeightBlockBytes = 64 * 1024;  // MLP weight rows shared by the batch's samples (in L2)
constexpr int64_t kPoolAvg = 0, kPoolMax = 1;
using cbam_lanes::kPrefetchRows;  // channels_last positions ahead that a pass prefetches (prefetch_values)


template <typename T>
inline T gate(T z, bool hard) {
  if (hard) {  // same expression as functional.apply_gate: clamp(z / 6 + 0.5, 0, 1)
    T v = z / T(6) + T(0.5);
    return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
  }
  return T(1) / (T(1) + std::exp(-z));
}

template <typename T>
struct Params {
  const T* w1;  // (hidden, C), nn.Linear layout
  const T* b1;  // (hidden,) or null
  const T* w2;  // (C, hidden)
  const T* b2;  // (C,) or null
  int64_t hidden;
  std::vector<int64_t> pools;  // kPoolAvg / kPoolMax in spec order
  const T* conv;               // (2, k, k): input channel mean_channel is the mean map
  int64_t k;
  int64_t mean_channel;
  T conv_bias;  // 0 when the conv has none
  T z_scale;    // eval BatchNorm folded to z * scale + shift (1, 0 without BN)
  T z_shift;
  bool hard;
  const T* in_scale;  // (C,) eval BatchNorm in front of the block, x = h * in_scale + in_shift; null: x given
  const T* in_shift;
  // (C,) eval BatchNorm on the residual (a ResNet downsample's), added as res * res_scale + res_shift; null: as is
  const T* res_scale = nullptr;
  const T* res_shift = nullptr;
};


// folds U consecutive channels_last rows into the per-channel sums and maxima (U = 4: the accumulators are
// loaded and stored once per four rows, not once per row; the same additions in the same order)
template <typename T, int U>
void pool_rows(const T* __restrict rows, const T* __restrict scale, const T* __restrict shift, int64_t C,
               T* __restrict sum, T* __restrict mx) {
  if (scale) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      T s = sum[c], m = mx[c];
      for (int u = 0; u < U; ++u) {
        const T v = rows[u * C + c] * scale[c] + shift[c];
        s += v;
        m = v > m ? v : m;
      }
      sum[c] = s, mx[c] = m;
    }
  } else {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      T s = sum[c], m = mx[c];
      for (int u = 0; u < U; ++u) {
        const T v = rows[u * C + c];
        s += v;
        m = v > m ? v : m;
      }
      sum[c] = s, mx[c] = m;
    }
  }
}

// per-channel sums and maxima over H*W -> sum[C], mx[C]
template <typename T, bool ChannelsLast>
void channel_pools(const T* x, const Affine<T>& in, int64_t C, int64_t HW, T* sum, T* mx) {
  if (!ChannelsLast) {
    for (int64_t c = 0; c < C; ++c) {
      if (in.scale)
        row_sum_max_affine(x + c * HW, in.scale[c], in.shift[c], HW, sum[c], mx[c]);
      else
        row_sum_max(x + c * HW, static_cast<const T*>(nullptr), HW, sum[c], mx[c]);
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    sum[c] = T(0);
    mx[c] = -std::numeric_limits<T>::infinity();
  }
  // vectorised across channels; a vector max drops NaN, but a NaN also makes the channel's sum NaN: then
  // (rarely) that channel's max is taken again, NaN-aware, as row_sum_max does for NCHW rows
  int64_t p = 0;
  for (; p + 4 <= HW; p += 4) {
    if (p + kPrefetchRows + 4 <= HW) prefetch_values(x + (p + kPrefetchRows) * C, 4 * C);
    pool_rows<T, 4>(x + p * C, in.scale, in.shift, C, sum, mx);
  }
  for (; p < HW; ++p) pool_rows<T, 1>(x + p * C, in.scale, in.shift, C, sum, mx);
  for (int64_t c = 0; c < C; ++c) {
    if (sum[c] != sum[c]) {
      T m = -std::numeric_limits<T>::infinity();
      for (int64_t p = 0; p < HW; ++p) m = nan_max(m, in.scale ? x[p * C + c] * in.scale[c] + in.shift[c] : x[p * C + c]);
      mx[c] = m;
    }
  }
}


template <typename T>
inline T relu(T v) {
  // NaN stays NaN, as in torch.relu (0 < NaN is false); one vmaxps(0, v), where the test for NaN took three more
  return T(0) > v ? T(0) : v;
}

// cg = gate(sum over pools of fc2(relu(fc1(pool)))), computed as gate(fc2_w (sum of relu(fc1(pool)))
// + P * fc2_b): fc2 is affine, so the pools share one fc2 product (same value, rounded differently).
// For all B samples at once (sums[b * C + c], ...): the MLP's weights are read in blocks of rows that stay in
// L2 while every sample uses them, where a sample at a time streamed them once per sample (ResNet-50's
// layer4: 2 MB of fc1 + fc2 weights per sample, most of that block's time). `sums` becomes the averages.
// Rows are grouped in fours from each block's start as from the matrix's (blocks are multiples of 4 rows), so
// every value is rounded exactly as a sample-at-a-time matvec2 rounds it.
template <typename T, typename ParallelFor>
void channel_gates(const Params<T>& p, int64_t B, int64_t C, int64_t HW, T* sums, const T* mxs, T* cgs,
                   ParallelFor&& parallel_for) {
  for (int64_t i = 0; i < B * C; ++i) sums[i] /= T(HW);
  const int64_t P = static_cast<int64_t>(p.pools.size()), H = p.hidden;
  auto pooled = [&](int64_t k, int64_t b) -> const T* {
    return k < P ? (p.pools[k] == kPoolAvg ? sums : mxs) + b * C : nullptr;
  };
  auto block_rows = [](int64_t cols) {
    const int64_t rows = kWeightBlockBytes / (std::max<int64_t>(1, cols) * static_cast<int64_t>(sizeof(T)));
    return std::max<int64_t>(4, rows / 4 * 4);
  };
  std::vector<T> h0(B * H), h1(B * H), hs(B * H);
  const int64_t rows1 = block_rows(C);
  parallel_for((H + rows1 - 1) / rows1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * rows1, n = std::min(rows1, H - r0);
      for (int64_t b = 0; b < B; ++b)
        matvec2(p.w1 + r0 * C, n, C, pooled(0, b), pooled(1, b), h0.data() + b * H + r0, h1.data() + b * H + r0);
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const T bias = p.b1 ? p.b1[h] : T(0);
      T v = relu(h0[b * H + h] + bias);
      if (P > 1) v += relu(h1[b * H + h] + bias);
      hs[b * H + h] = v;
    }
  }
  const int64_t rows2 = block_rows(H);
  parallel_for((C + rows2 - 1) / rows2, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * rows2, n = std::min(rows2, C - r0);
      for (int64_t b = 0; b < B; ++b)
        matvec2(p.w2 + r0 * H, n, H, hs.data() + b * H, static_cast<const T*>(nullptr), cgs + b * C + r0,
                static_cast<T*>(nullptr));
    }
  });
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      T& g = cgs[b * C + c];
      g = gate(p.b2 ? g + T(P) * p.b2[c] : g, p.hard);
    }
}

// mean and max over channels of y = x * cg (y rounded as the composed path stores it) at positions
// [p0, p1) -> mean[p], mx[p]; row: C values of scratch (channels_last with an input affine)
template <typename T, bool ChannelsLast>
void spatial_maps(const T* x, const Affine<T>& in, const T* cg, int64_t C, int64_t HW, int64_t p0, int64_t p1,
                  T* mean, T* mx, T* row) {
  if (!ChannelsLast) {
    for (int64_t t0 = p0; t0 < p1; t0 += kTile) {
      const int64_t n = std::min(kTile, p1 - t0);
      T* s = mean + t0;
      T* m = mx + t0;
      for (int64_t i = 0; i < n; ++i) {
        s[i] = T(0);
        m[i] = -std::numeric_limits<T>::infinity();
      }
      for (int64_t c = 0; c < C; ++c) {
        const T g = cg[c];
        const T* r = x + c * HW + t0;
        if (in.scale) {
          const T a = in.scale[c], e = in.shift[c];
          for (int64_t i = 0; i < n; ++i) {
            const T v = (r[i] * a + e) * g;
            s[i] += v;
            m[i] = nan_max(m[i], v);
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const T v = r[i] * g;
            s[i] += v;
            m[i] = nan_max(m[i], v);
          }
        }
      }
    }
  } else {
    auto nan_aware_row = [&](int64_t p) {  // the portable build's path, and a row whose sum is NaN
      const T* r = x + p * C;
      if (in.scale) {
        for (int64_t c = 0; c < C; ++c) row[c] = r[c] * in.scale[c] + in.shift[c];
        r = row;
      }
      row_sum_max(r, cg, C, mean[p], mx[p]);
    };
    // U positions at once; false: the portable build, whose caller takes each row NaN-aware
    auto rows = [&](auto u_const, int64_t p) {
      constexpr int U = decltype(u_const)::value;
      T s[U], m[U];
      if (p + kPrefetchRows + U <= p1) prefetch_values(x + (p + kPrefetchRows) * C, U * C);
      if (!rows_sum_max<U>(x + p * C, C, in.scale, in.shift, cg, s, m)) return false;
      for (int u = 0; u < U; ++u) {
        if (s[u] != s[u]) {
          nan_aware_row(p + u);
        } else {
          mean[p + u] = s[u], mx[p + u] = m[u];
        }
      }
      return true;
    };
    int64_t p = p0;
    while (p + 4 <= p1 && rows(std::integral_constant<int, 4>{}, p)) p += 4;
    for (; p < p1; ++p)
      if (!rows(std::integral_constant<int, 1>{}, p)) nan_aware_row(p);
  }
  for (int64_t i = p0; i < p1; ++i) mean[i] /= T(C);
}

// sg = gate(BN(conv_kxk([mean, max] in spec order) + bias)), zero 'same' padding, for the output rows
// [r0, r1) (they read the maps' rows r0 - k/2 .. r1 - 1 + k/2)
template <typename T>
void spatial_gate(const Params<T>& p, int64_t H, int64_t W, int64_t r0, int64_t r1, const T* mean, const T* mx,
                  T* z, T* sg) {
  const int64_t k = p.k, pad = k / 2;
  for (int64_t i = r0 * W; i < r1 * W; ++i) z[i] = T(0);
  for (int64_t ch = 0; ch < 2; ++ch) {
    const T* map = ch == p.mean_channel ? mean : mx;
    for (int64_t dy = 0; dy < k; ++dy) {
      for (int64_t dx = 0; dx < k; ++dx) {
        const T w = p.conv[(ch * k + dy) * k + dx];
        const int64_t oy = dy - pad, ox = dx - pad;  // output (i, j) reads map (i + oy, j + ox)
        const int64_t i0 = std::max<int64_t>(r0, -oy), i1 = std::min<int64_t>(r1, H - oy);
        const int64_t j0 = std::max<int64_t>(0, -ox), j1 = std::min<int64_t>(W, W - ox);
        for (int64_t i = i0; i < i1; ++i) {
          T* __restrict zr = z + i * W;  // restrict: distinct buffers, so the row vectorises
          const T* __restrict mr = map + (i + oy) * W + ox;
          for (int64_t j = j0; j < j1; ++j) zr[j] += w * mr[j];
        }
      }
    }
  }
  for (int64_t i = r0 * W; i < r1 * W; ++i) sg[i] = gate((z[i] + p.conv_bias) * p.z_scale + p.z_shift, p.hard);
}

// out = (x * cg) * sg, or relu((x * cg) * sg + res) with a residual (a ResNet block's shortcut add and ReLU;
// res * rs + rt with the residual's eval BatchNorm, rs null: none) at positions [p0, p1)
template <typename T, bool ChannelsLast>
void apply_gates(const T* x, const Affine<T>& in, const T* cg, const T* sg, const T* res, const T* rs, const T* rt,
                 int64_t C, int64_t HW, int64_t p0, int64_t p1, T* out) {
  if (!ChannelsLast) {
    const int64_t n = p1 - p0;
    for (int64_t c = 0; c < C; ++c) {
      const T g = cg[c];
      const T* row = x + c * HW + p0;
      const T* s = sg + p0;
      T* o = out + c * HW + p0;
      if (in.scale) {
        const T a = in.scale[c], e = in.shift[c];
        for (int64_t i = 0; i < n; ++i) o[i] = ((row[i] * a + e) * g) * s[i];
      } else {
        for (int64_t i = 0; i < n; ++i) o[i] = (row[i] * g) * s[i];
      }
      if (res) {
        const T* r = res + c * HW + p0;
        if (rs) {
          const T a = rs[c], e = rt[c];
          for (int64_t i = 0; i < n; ++i) o[i] = relu(o[i] + (r[i] * a + e));
        } else {
          for (int64_t i = 0; i < n; ++i) o[i] = relu(o[i] + r[i]);  // o is still in L1: a short second loop
        }
      }
    }
  } else {
    for (int64_t p = p0; p < p1; ++p) {
      const T s = sg[p];
      const T* row = x + p * C;
      if (p + kPrefetchRows < p1) {  // x's rows are in L2 (the maps read them a band earlier), res's in memory
        prefetch_values(row + kPrefetchRows * C, C);
        if (res) prefetch_values(res + (p + kPrefetchRows) * C, C);
      }
      T* o = out + p * C;
      if (res && gate_residual_row(row, in.scale, in.shift, cg, s, res + p * C, rs, rt, C, o)) continue;
      if (in.scale) {
        for (int64_t c = 0; c < C; ++c) o[c] = ((row[c] * in.scale[c] + in.shift[c]) * cg[c]) * s;
      } else {
        for (int64_t c = 0; c < C; ++c) o[c] = (row[c] * cg[c]) * s;
      }
      if (res) {
        const T* r = res + p * C;
        if (rs) {
          for (int64_t c = 0; c < C; ++c) o[c] = relu(o[c] + (r[c] * rs[c] + rt[c]));
        } else {
          for (int64_t c = 0; c < C; ++c) o[c] = relu(o[c] + r[c]);
        }
      }
    }
  }
}

// The whole block for samples [0, B) of x (B, C, H, W) or, ChannelsLast, (B, H, W, C): out = cbam(x), or
// relu(cbam(x) + res) with a residual (null: none, else not overlapping out). out may be x itself: every pass
// reads a position of x before the product pass writes it, and that pass reads x there only. parallel_for(n,
// body) runs body(begin, end) over disjoint ranges covering [0, n), on whatever threads the framework owns
// (ATen's pool, XLA's).
template <typename T, bool ChannelsLast, typename ParallelFor>
void run(const T* xd, const T* res, T* od, int64_t B, int64_t C, int64_t H, int64_t W, const Params<T>& p,
         ParallelFor&& parallel_for) {
  const int64_t HW = H * W;
  const int64_t pad = p.k / 2;
  // rows per band: about kBandBytes of x, and at least the conv's reach so each band frees rows to gate
  const int64_t row_bytes = C * W * static_cast<int64_t>(sizeof(T));
  // (channels_last only: an NCHW band is C short strided pieces, which ran the product pass slower than
  // re-reading the whole sample)
  const int64_t band =
      ChannelsLast ? std::max<int64_t>(std::max<int64_t>(1, pad), kBandBytes / std::max<int64_t>(1, row_bytes)) : H;
  const Affine<T> in{p.in_scale, p.in_shift};
  std::vector<T> sums(B * C), mxs(B * C), cgs(B * C);
  // one sample's maps, gate and product in bands of rows: the product re-reads rows the maps read a band earlier
  // (still in L2) instead of the whole sample again, which outgrows L2 (ResNet's layer1: 3.2 MB); NCHW runs the
  // three passes over the whole sample (one band)
  struct Scratch {
    std::vector<T> mean, cmax, z, sg, row;
  };
  auto gate_sample = [&](int64_t b, Scratch& s) {
    const T* xb = xd + b * C * HW;
    const T* cg = cgs.data() + b * C;
    const T* rb = res ? res + b * C * HW : nullptr;
    int64_t done = 0;  // rows gated and written
    for (int64_t r0 = 0; r0 < H; r0 += band) {
      const int64_t r1 = std::min(H, r0 + band);
      spatial_maps<T, ChannelsLast>(xb, in, cg, C, HW, r0 * W, r1 * W, s.mean.data(), s.cmax.data(), s.row.data());
      const int64_t ready = r1 == H ? H : std::max(done, r1 - pad);  // rows whose conv window is complete
      if (ready == done) continue;
      spatial_gate(p, H, W, done, ready, s.mean.data(), s.cmax.data(), s.z.data(), s.sg.data());
      apply_gates<T, ChannelsLast>(xb, in, cg, s.sg.data(), rb, p.res_scale, p.res_shift, C, HW, done * W, ready * W,
                                   od + b * C * HW);
      done = ready;
    }
  };
  auto scratch = [&] {
    return Scratch{std::vector<T>(HW), std::vector<T>(HW), std::vector<T>(HW), std::vector<T>(HW),
                   std::vector<T>(ChannelsLast && p.in_scale ? C : 0)};
  };
  // Where the MLP's weights are no larger than a sample (ResNet's layer1 to layer3), each sample runs all its
  // passes in turn, so the second read of x finds it in L3 (a batch of layer1 outgrows L3 between the passes);
  // where they are larger (layer4: 2 MB per block against 0.4 MB per sample), the batch shares one read of the
  // weights and its x stays in L3 anyway. Same values either way (channel_gates rounds each sample alike).
  const int64_t weight_bytes = 2 * p.hidden * C * static_cast<int64_t>(sizeof(T));
  if (weight_bytes <= C * HW * static_cast<int64_t>(sizeof(T))) {
    parallel_for(B, [&](int64_t begin, int64_t end) {
      Scratch s = scratch();
      const auto serial = [](int64_t n, const auto& body) { body(0, n); };
      for (int64_t b = begin; b < end; ++b) {
        channel_pools<T, ChannelsLast>(xd + b * C * HW, in, C, HW, sums.data() + b * C, mxs.data() + b * C);
        channel_gates(p, 1, C, HW, sums.data() + b * C, mxs.data() + b * C, cgs.data() + b * C, serial);
        gate_sample(b, s);
      }
    });
    return;
  }
  parallel_for(B, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      channel_pools<T, ChannelsLast>(xd + b * C * HW, in, C, HW, sums.data() + b * C, mxs.data() + b * C);
  });
  channel_gates(p, B, C, HW, sums.data(), mxs.data(), cgs.data(), parallel_for);
  parallel_for(B, [&](int64_t begin, int64_t end) {
    Scratch s = scratch();
    for (int64_t b = begin; b < end; ++b) gate_sample(b, s);
  });
}

// An eval BatchNorm on the spatial conv's output as torch computes it: z * (gamma * invstd) + (beta - mean *
// gamma * invstd)
template <typename T>
void fold_eval_bn(T weight, T bias, T mean, T var, double eps, Params<T>& p) {
  const T invstd = T(1) / std::sqrt(var + T(eps));
  p.z_scale = weight * invstd;
  p.z_shift = bias - mean * p.z_scale;
}

}  // namespace cbam_infer_core
