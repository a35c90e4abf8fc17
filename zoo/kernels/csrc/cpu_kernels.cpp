// zoo's CPU kernels, compiled once per machine by zoo/kernels/cpu.py (torch.utils.cpp_extension)
// and registered as torch ops: torch.ops.zoo_cpu.<name>.
//
// gather_gemv: y[n] = bias + Σ_k values[n, k] · wt[indices[n, k]]   (wt [in, out] row-major)
//   the sparse-input GEMV of Q-Sparse decode. Without indices, row k of wt is row k (a dense GEMV),
//   except that a row of values holding zeros reads only the weight rows of its nonzero entries (it is
//   compacted to them first: a threshold-sparse, ReLU or quantized input skips the rest; a weight row
//   of a zero entry never contributes, even inf or NaN).
//   wt float32, bfloat16 or int8 — int8 meaning BitNet's ternary weights {-1, 0, +1}, with integer
//   activations in [-128, 127] as the values: summed exactly in integers (see gemv_columns<int8_t>) —
//   or uint8: the same ternary weights packed 2 bits each (zoo/kernels/ternary.py's `packed` layout,
//   [in, R] bytes, byte (i, j) holding outputs j, j+R, j+2R, j+3R as w+1), y then [N, 4R].
// topk_gemv: the same after selecting, in each row of x, the k entries of largest |x| (ties to the
//   lower index, as zoo.blocks.sparsity.topk_mask keeps them; a NaN counts as largest, so it is kept
//   and shows in y), so a Q-Sparse projection at decode is one call.
// ternary_gemv: a frozen BitNet b1.58 projection after its norm, in one call: optional top-K (as
//   above), per-token absmax int8 quantization (s = 127 / max(max|x|, eps), q = clamp(round(x·s))),
//   the exact integer GEMV over the kept rows of the ternary weight, then y = acc / s · β (+ bias).
// decode_attention: one query per head over every cached key (a decode step's attention: the newest position
//   sees the whole cache, no mask), grouped-query heads sharing a key/value head, the cache read in place in
//   its own dtype (fp32, bf16, fp16) and summed in fp32: y = softmax(scale · q·kᵀ) · v. torch's CPU SDPA
//   costs ~20 µs per call at 64 keys on a 2-core VM for ~0.1 M multiply-adds (its tiled blocks are sized for
//   prefill); a layer of SmolLM2's decode needs ~2 µs of arithmetic.
//
// Why not F.embedding_bag, which computes the same sum: it walks the output in short vectors and,
// for each, every kept row, so the weight rows are read in scattered 64-byte pieces. Here each
// thread owns a column range of y, keeps it in L1 as fp32 accumulators, and streams R weight rows
// at a time across the whole range: every read is a long contiguous run the prefetcher can follow,
// and each accumulator is loaded and stored once per R rows.
// ATen's vectors (at::vec) in this machine's widest instruction set (the file is compiled -march=native)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {  // bf16 is the top half of an fp32: exact
  const uint32_t bits = uint32_t(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int64_t TILE = 8192;  // accumulators per pass (32 KiB of fp32: one core's L1)
constexpr int R = 16;           // weight rows summed per pass over the accumulators
constexpr int R_PACKED = 16;    // packed ternary rows per pass: 8 pair sums of |.| <= 512 fit int16 lanes
constexpr int64_t SPLIT_K_BELOW = 2048;  // output columns per thread below which threads split the rows instead

// bf16 rows are read differently (measured on cold weights, docs/kernels.md): 8 rows per pass, and
// while a pass sums the rows of one 64-column segment it prefetches the same segment of the next
// pass's rows, so the next rows' cache lines are in flight before the pass reaches them. fp32 rows
// stream at the bandwidth floor with 16 rows and the hardware prefetcher alone; prefetching them too
// only took load slots.
template <typename T> constexpr int rows_per_pass = R;
template <> constexpr int rows_per_pass<c10::BFloat16> = 8;
template <typename T> constexpr bool prefetch_next = false;
template <> constexpr bool prefetch_next<c10::BFloat16> = true;
constexpr int64_t SEGMENT = 64;  // columns summed per prefetch step

// y[c0:c1] = bias[c0:c1] + Σ_k v[k] · wt[row(k), c0:c1], row(k) = idx[k] (idx == nullptr: k)
template <typename T>
void gemv_columns(const float* v, const int64_t* idx, int64_t K, const T* wt, int64_t out, const float* bias,
                  float* y, int64_t c0, int64_t c1) {
  constexpr int P = rows_per_pass<T>;
  alignas(64) float acc[TILE];
  for (int64_t t0 = c0; t0 < c1; t0 += TILE) {
    const int64_t n = std::min(TILE, c1 - t0);
    for (int64_t j = 0; j < n; ++j) acc[j] = bias ? bias[t0 + j] : 0.f;
    int64_t k = 0;
    for (; k + P <= K; k += P) {
      const T* r[P];
      const T* next[P];  // the next pass's rows (the last row again past the end): prefetched
      float a[P];
      for (int p = 0; p < P; ++p) {
        r[p] = wt + (idx ? idx[k + p] : k + p) * out + t0;
        a[p] = v[k + p];
        const int64_t q = std::min(K - 1, k + P + p);
        next[p] = wt + (idx ? idx[q] : q) * out + t0;
      }
      const auto sum_rows = [&](int64_t j0, int64_t j1) {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
          for (int p = 0; p < P; p += 4) {
            s0 += a[p] * widen(r[p][j]);
            s1 += a[p + 1] * widen(r[p + 1][j]);
            s2 += a[p + 2] * widen(r[p + 2][j]);
            s3 += a[p + 3] * widen(r[p + 3][j]);
          }
          acc[j] += (s0 + s1) + (s2 + s3);
        }
      };
      int64_t j0 = 0;
      if constexpr (prefetch_next<T>) {
        for (; j0 + SEGMENT <= n; j0 += SEGMENT) {
          for (int p = 0; p < P; ++p)
            for (int64_t b = 0; b < SEGMENT * int64_t(sizeof(T)); b += 64)
              __builtin_prefetch(reinterpret_cast<const char*>(next[p] + j0) + b);
          sum_rows(j0, j0 + SEGMENT);
        }
      }
      sum_rows(j0, n);
    }
    for (; k < K; ++k) {
      const T* row = wt + (idx ? idx[k] : k) * out + t0;
      const float a = v[k];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += a * widen(row[j]);
    }
    std::memcpy(y + t0, acc, n * sizeof(float));
  }
}

// Ternary weights (int8 holding -1, 0, +1) times integer activations in [-128, 127] (the values, as
// floats): 16 rows are summed in int16 lanes (|Σ| <= 16·128 fits), twice as many lanes per vector as
// fp32, then added into int32 accumulators; the result is exact, like an int32 matmul.
template <>
void gemv_columns<int8_t>(const float* v, const int64_t* idx, int64_t K, const int8_t* wt, int64_t out,
                          const float* bias, float* y, int64_t c0, int64_t c1) {
  alignas(64) int32_t acc[TILE];
  for (int64_t t0 = c0; t0 < c1; t0 += TILE) {
    const int64_t n = std::min(TILE, c1 - t0);
    for (int64_t j = 0; j < n; ++j) acc[j] = 0;
    int64_t k = 0;
    for (; k + R <= K; k += R) {
      const int8_t* r[R];
      int16_t a[R];
      for (int p = 0; p < R; ++p) {
        r[p] = wt + (idx ? idx[k + p] : k + p) * out + t0;
        a[p] = static_cast<int16_t>(v[k + p]);
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        int16_t s = 0;
        for (int p = 0; p < R; ++p) s = static_cast<int16_t>(s + a[p] * r[p][j]);
        acc[j] += s;
      }
    }
    for (; k < K; ++k) {
      const int8_t* row = wt + (idx ? idx[k] : k) * out + t0;
      const int32_t a = static_cast<int32_t>(v[k]);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += a * row[j];
    }
    for (int64_t j = 0; j < n; ++j) y[t0 + j] = static_cast<float>(acc[j]) + (bias ? bias[t0 + j] : 0.f);
  }
}

// Packed ternary weights (4 per byte, stored as c = w + 1 ∈ {0, 1, 2}: byte j of a row holds outputs j, j+R,
// j+2R, j+3R at bits 0-1, 2-3, 4-5, 6-7) times integer activations a ∈ [-128, 127]: Σ a·w = Σ a·c − Σ a.
// A row costs R bytes of reads instead of the int8 layout's 4R. With AVX2, two rows' bytes are interleaved
// and each 2-bit field, shifted and masked in place, is multiplied by the two rows' activations and summed
// in pairs by one `maddubs` (u8 codes × s8 activations → s16, |c₀a₀ + c₁a₁| ≤ 512): 8 pairs (16 rows)
// summed in s16 lanes (≤ 4096), then added to int32 accumulators less Σ a. Exact, like an int32 matmul.
// The column range [c0, c1) is of bytes; y (the row's start) receives the four output segments.
inline void packed_rows_scalar(const uint8_t* const* r, const int16_t* a, int rows, int64_t j0, int64_t j1,
                               int32_t (*acc)[TILE / 4]) {
  for (int64_t j = j0; j < j1; ++j)
    for (int p = 0; p < rows; ++p)
      for (int s = 0; s < 4; ++s) acc[s][j] += a[p] * (((r[p][j] >> (2 * s)) & 3) - 1);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// With AVX-512 VNNI (Zen 4, Ice Lake and later) four rows go at once: 64 bytes of each are interleaved so
// that every 32-bit lane holds the four rows' bytes of one column (two unpack steps), each 2-bit field is
// shifted and masked in place, and one `vpdpbusd` multiplies the four codes by the four rows' activations
// and adds them to an int32 accumulator: no int16 stage, 4 rows × 64 columns a field per instruction.
// The unpacks leave the columns of a 64-byte block in a fixed order (vector m, 128-bit lane L, lane
// element d holds column 16L + 4m + d): the accumulators keep that order and the output undoes it. A
// row's last partial block is read with a byte mask (nothing past the row is touched).
inline int64_t vnni_position(int64_t j) {
  const int64_t c = j & 63;
  return (j & ~int64_t(63)) + 16 * ((c >> 2) & 3) + 4 * (c >> 4) + (c & 3);
}

template <>
void gemv_columns<uint8_t>(const float* v, const int64_t* idx, int64_t K, const uint8_t* wt, int64_t R,
                           const float* bias, float* y, int64_t c0, int64_t c1) {
  constexpr int64_t BYTES = TILE / 4;
  alignas(64) int32_t acc[4][BYTES];
  const __m512i field[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0C), _mm512_set1_epi8(0x30),
                             _mm512_set1_epi8(static_cast<char>(0xC0))};
  for (int64_t t0 = c0; t0 < c1; t0 += BYTES) {
    const int64_t n = std::min(BYTES, c1 - t0), blocks = (n + 63) / 64;
    for (int s = 0; s < 4; ++s) std::fill(acc[s], acc[s] + blocks * 64, 0);
    int32_t total_a = 0;
    // passes of R_PACKED rows (four groups of 4); the last one filled up with activations 0 on a real row
    for (int64_t k = 0; k < K; k += R_PACKED) {
      const uint8_t* r[R_PACKED];
      uint8_t a[R_PACKED];
      const int64_t m = std::min<int64_t>(R_PACKED, K - k);
      for (int p = 0; p < R_PACKED; ++p) {
        r[p] = wt + (idx ? idx[k + std::min<int64_t>(p, m - 1)] : k + std::min<int64_t>(p, m - 1)) * R + t0;
        const int32_t ap = p < m ? static_cast<int32_t>(v[k + p]) : 0;
        a[p] = static_cast<uint8_t>(static_cast<int8_t>(ap));
        total_a += ap;
        // the next pass's rows, asked for now (2, 4 or 8 passes ahead, or into L2 only, measured no faster)
        const int64_t q = std::min(K - 1, k + R_PACKED + p);
        const uint8_t* next = wt + (idx ? idx[q] : q) * R + t0;
        for (int64_t b = 0; b < n; b += 64) __builtin_prefetch(next + b);
      }
      __m512i quad[R_PACKED / 4];  // the activations of rows 4g..4g+3 as the 4 bytes of every lane
      for (int g = 0; g < R_PACKED / 4; ++g) {
        uint32_t w4;
        std::memcpy(&w4, a + 4 * g, 4);
        quad[g] = _mm512_set1_epi32(static_cast<int32_t>(w4));
      }
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t j0 = blk * 64, valid = std::min<int64_t>(64, n - j0);
        const __mmask64 live = valid == 64 ? ~__mmask64(0) : (__mmask64(1) << valid) - 1;
        __m512i sum[4][4];
        for (int s = 0; s < 4; ++s)
          for (int q = 0; q < 4; ++q) sum[s][q] = _mm512_load_si512(acc[s] + j0 + 16 * q);
        for (int g = 0; g < R_PACKED / 4; ++g) {
          const __m512i b0 = _mm512_maskz_loadu_epi8(live, r[4 * g] + j0);
          const __m512i b1 = _mm512_maskz_loadu_epi8(live, r[4 * g + 1] + j0);
          const __m512i b2 = _mm512_maskz_loadu_epi8(live, r[4 * g + 2] + j0);
          const __m512i b3 = _mm512_maskz_loadu_epi8(live, r[4 * g + 3] + j0);
          const __m512i l01 = _mm512_unpacklo_epi8(b0, b1), l23 = _mm512_unpacklo_epi8(b2, b3);
          const __m512i h01 = _mm512_unpackhi_epi8(b0, b1), h23 = _mm512_unpackhi_epi8(b2, b3);
          const __m512i quads[4] = {_mm512_unpacklo_epi16(l01, l23), _mm512_unpackhi_epi16(l01, l23),
                                    _mm512_unpacklo_epi16(h01, h23), _mm512_unpackhi_epi16(h01, h23)};
          for (int q = 0; q < 4; ++q)  // field s masked in place: its codes times 4^s (undone at the output)
            for (int f = 0; f < 4; ++f)
              sum[f][q] = _mm512_dpbusd_epi32(sum[f][q], _mm512_and_si512(quads[q], field[f]), quad[g]);
        }
        for (int s = 0; s < 4; ++s)
          for (int q = 0; q < 4; ++q) _mm512_store_si512(acc[s] + j0 + 16 * q, sum[s][q]);
      }
    }
    for (int s = 0; s < 4; ++s)  // Σ a·w = Σ a·c − Σ a; field s summed c·4^s: an exact division (a shift)
      for (int64_t j = 0; j < n; ++j)
        y[s * R + t0 + j] = static_cast<float>((acc[s][vnni_position(j)] >> (2 * s)) - total_a);
  }
}
#else
template <>
void gemv_columns<uint8_t>(const float* v, const int64_t* idx, int64_t K, const uint8_t* wt, int64_t R,
                           const float* bias, float* y, int64_t c0, int64_t c1) {
  constexpr int64_t BYTES = TILE / 4;
  alignas(64) int32_t acc[4][BYTES];
  for (int64_t t0 = c0; t0 < c1; t0 += BYTES) {
    const int64_t n = std::min(BYTES, c1 - t0);
    for (int s = 0; s < 4; ++s) std::fill(acc[s], acc[s] + n, 0);
    // passes of R_PACKED rows; the last one filled up with activations 0 (adding nothing) on a real row,
    // so a row count off the multiple (571 nonzero activations) costs a pass, not a scalar loop per row
    for (int64_t k = 0; k < K; k += R_PACKED) {
      const uint8_t* r[R_PACKED];
      int16_t a[R_PACKED];
      int32_t sum_a = 0;
      const int64_t m = std::min<int64_t>(R_PACKED, K - k);
      for (int p = 0; p < R_PACKED; ++p) {
        r[p] = wt + (idx ? idx[k + std::min<int64_t>(p, m - 1)] : k + std::min<int64_t>(p, m - 1)) * R + t0;
        a[p] = p < m ? static_cast<int16_t>(v[k + p]) : 0;
        sum_a += a[p];
        // a row is only R bytes (a few cache lines): too short a stream for the hardware prefetcher to
        // follow, so the next pass's rows are asked for while this pass sums
        const int64_t q = std::min(K - 1, k + R_PACKED + p);
        const uint8_t* next = wt + (idx ? idx[q] : q) * R + t0;
        for (int64_t b = 0; b < n; b += 64) __builtin_prefetch(next + b);
      }
      int64_t j = 0;
#if defined(__AVX2__)
      __m256i pair_a[R_PACKED / 2];
      for (int p = 0; p < R_PACKED; p += 2)
        pair_a[p / 2] = _mm256_set1_epi16(static_cast<int16_t>((uint16_t(uint8_t(a[p + 1])) << 8) | uint8_t(a[p])));
      const __m256i mask = _mm256_set1_epi8(3), minus = _mm256_set1_epi32(sum_a);
      // 32 columns from j0, adding only columns >= j0 + skip (the last block of a row overlaps the one before)
      const auto block = [&](int64_t j0, int skip) {
        __m256i lo[4], hi[4];  // s16 sums: lo holds columns j0+0..7, j0+16..23; hi j0+8..15, j0+24..31
        for (int s = 0; s < 4; ++s) lo[s] = hi[s] = _mm256_setzero_si256();
        for (int p = 0; p < R_PACKED; p += 2) {
          const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[p] + j0));
          const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r[p + 1] + j0));
          const __m256i il = _mm256_unpacklo_epi8(b0, b1), ih = _mm256_unpackhi_epi8(b0, b1);
          for (int s = 0; s < 4; ++s) {
            const __m256i cl = _mm256_and_si256(_mm256_srli_epi16(il, 2 * s), mask);
            const __m256i ch = _mm256_and_si256(_mm256_srli_epi16(ih, 2 * s), mask);
            lo[s] = _mm256_add_epi16(lo[s], _mm256_maddubs_epi16(cl, pair_a[p / 2]));
            hi[s] = _mm256_add_epi16(hi[s], _mm256_maddubs_epi16(ch, pair_a[p / 2]));
          }
        }
        for (int s = 0; s < 4; ++s) {
          const __m256i first = _mm256_permute2x128_si256(lo[s], hi[s], 0x20);   // columns j0+0..15
          const __m256i second = _mm256_permute2x128_si256(lo[s], hi[s], 0x31);  // columns j0+16..31
          const __m256i parts[4] = {_mm256_cvtepi16_epi32(_mm256_castsi256_si128(first)),
                                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256(first, 1)),
                                    _mm256_cvtepi16_epi32(_mm256_castsi256_si128(second)),
                                    _mm256_cvtepi16_epi32(_mm256_extracti128_si256(second, 1))};
          for (int q = 0; q < 4; ++q) {
            __m256i add = _mm256_sub_epi32(parts[q], minus);
            if (skip > 8 * q) {  // zero the lanes of columns already summed
              const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
              add = _mm256_and_si256(add, _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(skip - 8 * q - 1)));
            }
            __m256i* dst = reinterpret_cast<__m256i*>(acc[s] + j0 + 8 * q);
            _mm256_storeu_si256(dst, _mm256_add_epi32(_mm256_loadu_si256(dst), add));
          }
        }
      };
      for (; j + 32 <= n; j += 32) block(j, 0);
      if (j < n && n >= 32) {
        block(n - 32, static_cast<int>(j - (n - 32)));
        j = n;
      }
#endif
      packed_rows_scalar(r, a, R_PACKED, j, n, acc);
    }
    for (int s = 0; s < 4; ++s)
      for (int64_t j = 0; j < n; ++j) y[s * R + t0 + j] = static_cast<float>(acc[s][j]);
  }
}
#endif

// y [N, yw] = v [N, K] times the rows idx [N, K] (nullptr: 0..K-1) of w [in, out], on raw pointers (no tensor
// made: a decode call's fixed cost); out: the weight layout's columns (packed: bytes); yw: y's width (packed:
// 4 outputs per byte)
template <typename T>
void gemv_rows(const float* v, const int64_t* idx, int64_t N, int64_t K, const T* w, int64_t out, int64_t yw,
               const float* bias, float* yp, int64_t chunks) {
  constexpr int P = rows_per_pass<T>;
  if (chunks > 1 && out < SPLIT_K_BELOW * chunks && K >= 2 * P * chunks) {
    // a narrow output: each thread takes a share of the rows over all columns (longer contiguous
    // reads than a share of the columns), and the partial sums are added at the end
    const int64_t share = ((K + chunks - 1) / chunks + P - 1) / P * P;
    std::vector<float> partial((chunks - 1) * N * yw);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t k0 = std::min(K, c * share), k1 = std::min(K, (c + 1) * share);
        for (int64_t i = 0; i < N; ++i) {
          float* dst = c == 0 ? yp + i * yw : partial.data() + ((c - 1) * N + i) * yw;
          gemv_columns<T>(v + i * K + k0, idx ? idx + i * K + k0 : nullptr, k1 - k0, idx ? w : w + k0 * out, out,
                          c == 0 ? bias : nullptr, dst, 0, out);
        }
      }
    });
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t i = 0; i < N * yw; ++i) yp[i] += partial[(c - 1) * N * yw + i];
    return;
  }
  const int64_t chunk = ((out + chunks - 1) / chunks + 15) / 16 * 16;  // 64-byte aligned column ranges
  at::parallel_for(0, (out + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      for (int64_t i = 0; i < N; ++i)
        gemv_columns<T>(v + i * K, idx ? idx + i * K : nullptr, K, w, out, bias, yp + i * yw, c * chunk,
                        std::min(out, (c + 1) * chunk));
  });
}

// one row's nonzero entries of x [width] into (idx, v): the rows of w a zero would multiply are never read
inline int64_t nonzero_entries(const float* x, int64_t width, int64_t* idx, float* v) {
  int64_t K = 0;
  for (int64_t j = 0; j < width; ++j)
    if (x[j] != 0.f) {  // NaN included: it is kept and shows in y
      idx[K] = j;
      v[K++] = x[j];
    }
  return K;
}

// gemv_rows by the weight layout's dtype
void gemv_rows_any(const float* v, const int64_t* idx, int64_t N, int64_t K, const at::Tensor& wt, int64_t yw,
                   const float* bias, float* y, int64_t chunks) {
  const int64_t out = wt.size(1);
  switch (wt.scalar_type()) {
    case at::kFloat: return gemv_rows<float>(v, idx, N, K, wt.data_ptr<float>(), out, yw, bias, y, chunks);
    case at::kBFloat16:
      return gemv_rows<c10::BFloat16>(v, idx, N, K, wt.data_ptr<c10::BFloat16>(), out, yw, bias, y, chunks);
    case at::kChar: return gemv_rows<int8_t>(v, idx, N, K, wt.data_ptr<int8_t>(), out, yw, bias, y, chunks);
    case at::kByte: return gemv_rows<uint8_t>(v, idx, N, K, wt.data_ptr<uint8_t>(), out, yw, bias, y, chunks);
    default: TORCH_CHECK(false, "gather_gemv: wt must be float32, bfloat16, int8 or uint8 (packed ternary)");
  }
}

void gather_gemv(const at::Tensor& values, const std::optional<at::Tensor>& indices, const at::Tensor& wt,
                 const std::optional<at::Tensor>& bias, int64_t chunks, at::Tensor& y);

// A dense call whose rows hold zeros: each row goes through the indexed path with its nonzero entries
// only, so the weight rows of its zero entries are never read (an all-zero row gives the bias).
void gather_gemv_nonzero(const at::Tensor& values, const at::Tensor& wt, const float* bias, int64_t chunks,
                         at::Tensor& y) {
  const int64_t N = values.size(0), width = values.size(1), yw = y.size(1);
  std::vector<float> kept(width);
  std::vector<int64_t> where(width);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t K = nonzero_entries(values.data_ptr<float>() + i * width, width, where.data(), kept.data());
    gemv_rows_any(kept.data(), where.data(), 1, K, wt, yw, bias, y.data_ptr<float>() + i * yw, chunks);
  }
}

void gather_gemv(const at::Tensor& values, const std::optional<at::Tensor>& indices, const at::Tensor& wt,
                 const std::optional<at::Tensor>& bias, int64_t chunks, at::Tensor& y) {
  TORCH_CHECK(values.dim() == 2 && values.scalar_type() == at::kFloat && values.is_contiguous(),
              "gather_gemv: values must be contiguous float32 [N, K]");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), "gather_gemv: wt must be contiguous [in, out]");
  const bool packed = wt.scalar_type() == at::kByte;
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 && y.size(0) == values.size(0) &&
              y.size(1) == (packed ? 4 : 1) * wt.size(1),
              "gather_gemv: y must be contiguous float32 [N, out] (packed uint8 weights: [N, 4 * wt.size(1)])");
  TORCH_CHECK(!(packed && bias.has_value()), "gather_gemv: no bias with packed weights");
  const int64_t* idx = nullptr;
  if (indices.has_value()) {
    TORCH_CHECK(indices->sizes() == values.sizes() && indices->scalar_type() == at::kLong && indices->is_contiguous(),
                "gather_gemv: indices must be contiguous int64 of the shape of values");
    idx = indices->data_ptr<int64_t>();
    const int64_t rows = wt.size(0);
    for (int64_t i = 0; i < indices->numel(); ++i)
      TORCH_CHECK(0 <= idx[i] && idx[i] < rows, "gather_gemv: index ", idx[i], " out of range [0, ", rows, ")");
  } else {
    TORCH_CHECK(values.size(1) == wt.size(0), "gather_gemv: dense rows need K == in");
  }
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == wt.size(1) && bias->is_contiguous(),
                "gather_gemv: bias must be contiguous float32 [out]");
    b = bias->data_ptr<float>();
  }
  chunks = std::max<int64_t>(1, chunks);
  const float* x = values.data_ptr<float>();
  if (!idx && std::find(x, x + values.numel(), 0.f) != x + values.numel())
    return gather_gemv_nonzero(values, wt, b, chunks, y);
  gemv_rows_any(x, idx, values.size(0), values.size(1), wt, y.size(1), b, y.data_ptr<float>(), chunks);
}

// The k entries of largest |x| of one row, as ascending indices and their values. A threshold (the
// k-th largest |x|, nth_element) and one left-to-right pass: entries above it, then tied ones while
// fewer than k are kept.
// `mag` and `part` are scratch of `width` floats, reused across rows.
void select_topk(const float* x, int64_t width, int64_t k, std::vector<float>& mag, std::vector<float>& part,
                 int64_t* idx, float* val) {
  mag.resize(width);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < width; ++j) mag[j] = std::isnan(x[j]) ? inf : std::fabs(x[j]);
  part.assign(mag.begin(), mag.end());
  std::nth_element(part.begin(), part.begin() + (width - k), part.end());
  const float t = part[width - k];
  int64_t above = 0;
  for (int64_t j = 0; j < width; ++j) above += mag[j] > t;
  int64_t ties = k - above, n = 0;
  for (int64_t j = 0; j < width && n < k; ++j) {
    if (mag[j] > t || (mag[j] == t && ties-- > 0)) {
      idx[n] = j;
      val[n++] = x[j];
    }
  }
}

void topk_gemv(const at::Tensor& x, int64_t k, const at::Tensor& wt, const std::optional<at::Tensor>& bias,
               int64_t chunks, at::Tensor& y, at::Tensor& indices) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "topk_gemv: x must be contiguous float32 [N, in]");
  TORCH_CHECK(x.size(1) == wt.size(0) && 0 < k && k <= x.size(1), "topk_gemv: need 0 < k <= in == wt.size(0)");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.is_contiguous() && indices.dim() == 2 &&
              indices.size(0) == x.size(0) && indices.size(1) == k, "topk_gemv: indices must be int64 [N, k]");
  const int64_t N = x.size(0), width = x.size(1);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == wt.size(1) && bias->is_contiguous(),
                "topk_gemv: bias must be contiguous float32 [out]");
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.scalar_type() != at::kByte,
              "topk_gemv: wt must be contiguous [in, out], float32, bfloat16 or int8");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 &&
              y.size(0) == N && y.size(1) == wt.size(1), "topk_gemv: y must be contiguous float32 [N, out]");
  std::vector<float> mag, part, values(N * k);  // reused buffers, no tensor made (a decode call's fixed cost)
  for (int64_t i = 0; i < N; ++i)
    select_topk(x.data_ptr<float>() + i * width, width, k, mag, part, indices.data_ptr<int64_t>() + i * k,
                values.data() + i * k);
  gemv_rows_any(values.data(), indices.data_ptr<int64_t>(), N, k, wt, y.size(1),
                bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), std::max<int64_t>(1, chunks));
}

void ternary_gemv(const at::Tensor& x, int64_t k, const at::Tensor& w, const at::Tensor& beta,
                  const std::optional<at::Tensor>& bias, double eps, int64_t chunks, at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "ternary_gemv: x must be contiguous float32 [N, in]");
  const bool packed = w.scalar_type() == at::kByte;  // 4 weights per byte: y's width says how many outputs
  TORCH_CHECK((w.scalar_type() == at::kChar || packed) && w.dim() == 2 && w.is_contiguous() && w.size(0) == x.size(1),
              "ternary_gemv: w must be contiguous int8 [in, out] or packed uint8 [in, ceil(out / 4)]");
  TORCH_CHECK(0 <= k && k <= x.size(1), "ternary_gemv: need 0 <= k <= in (0: no top-K)");
  const int64_t N = x.size(0), width = x.size(1), out = packed ? y.size(1) : w.size(1), kept = k > 0 ? k : width;
  TORCH_CHECK(!packed || (y.dim() == 2 && out <= 4 * w.size(1) && out > 4 * (w.size(1) - 1)),
              "ternary_gemv: packed weights of ", w.size(1), " bytes per row cannot give ", out, " outputs");
  TORCH_CHECK(beta.scalar_type() == at::kFloat && beta.is_contiguous() && (beta.numel() == 1 || beta.numel() == out),
              "ternary_gemv: beta must be contiguous float32, one value or one per output");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.dim() == 2 && y.size(0) == N && y.size(1) == out,
              "ternary_gemv: y must be contiguous float32 [N, out]");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == out && bias->is_contiguous(),
                "ternary_gemv: bias must be contiguous float32 [out]");
  // per row, on reused buffers (no tensor made: a decode call's fixed cost): the kept entries, quantized, then
  // only the nonzero ones (a small |x| rounds to 0: its weight row is not read) times their weight rows
  chunks = std::max<int64_t>(1, chunks);
  const int64_t aw = packed ? 4 * w.size(1) : out;  // the GEMV's width (packed: padded to 4 per byte)
  std::vector<float> mag, part, vals(width), nz(width), acc(aw);
  std::vector<int64_t> sel(kept), where(width);
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* be = beta.data_ptr<float>();
  // vals[0:count] quantized by s in place, then its nonzero entries into (where, nz): their weight row is
  // rows[j] (the selected inputs) or j; returns how many
  const auto quantized_nonzero = [&](int64_t count, const int64_t* rows, float s) {
    for (int64_t j = 0; j < count; ++j) vals[j] = std::min(127.f, std::max(-128.f, std::nearbyint(vals[j] * s)));
    const int64_t K = nonzero_entries(vals.data(), count, where.data(), nz.data());
    if (rows)
      for (int64_t j = 0; j < K; ++j) where[j] = rows[where[j]];
    return K;
  };
  for (int64_t i = 0; i < N; ++i) {
    const float* xi = x.data_ptr<float>() + i * width;
    // The whole row first. Its absmax is the kept entries' too (the largest |x| is always kept), and an entry
    // quantizes to nonzero only if |x·s| > 1/2 (round to nearest even), so above every entry that quantizes
    // to 0: when at most k entries quantize to nonzero they are all among the k largest, and the sum over
    // them is the top-K's exactly — no selection needed (a row sparser than keep already). A NaN (kept by
    // the selection as the largest) takes the selection.
    float amax = 0.f;
    bool nan = false;
    for (int64_t j = 0; j < width; ++j) {
      const float m = std::fabs(xi[j]);
      nan |= std::isnan(m);
      amax = std::max(amax, m);
    }
    float s = 127.f / std::max(amax, static_cast<float>(eps));
    bool select = k > 0 && nan;
    if (k > 0 && !nan) {
      int64_t nonzero = 0;
      for (int64_t j = 0; j < width; ++j) nonzero += std::fabs(xi[j] * s) > 0.5f;
      select = nonzero > k;
    }
    int64_t K;
    if (select) {  // the k largest |x|, quantized by their own absmax
      select_topk(xi, width, k, mag, part, sel.data(), vals.data());
      amax = 0.f;
      for (int64_t j = 0; j < k; ++j) amax = std::max(amax, std::fabs(vals[j]));
      s = 127.f / std::max(amax, static_cast<float>(eps));
      K = quantized_nonzero(k, sel.data(), s);
    } else {
      std::memcpy(vals.data(), xi, width * sizeof(float));
      K = quantized_nonzero(width, nullptr, s);
    }
    gemv_rows_any(nz.data(), K == width ? nullptr : where.data(), 1, K, w, aw, nullptr, acc.data(), chunks);
    const float r = 1.f / s;
    float* yi = y.data_ptr<float>() + i * out;
    for (int64_t j = 0; j < out; ++j) {
      const float t = acc[j] * r * be[beta.numel() == 1 ? 0 : j];
      yi[j] = b ? t + b[j] : t;
    }
  }
}

// ---- decode attention ----------------------------------------------------------------------------------

// One key/value head and the G query heads that share it (grouped-query): each key row is read once for the G
// scores, each value row once for the G weighted sums; at::vec vectors (AVX-512 or AVX2, as compiled) with
// the scores' exp from ATen's vectorized exp (1 ulp). q: G rows of D at stride qh; k, v: L rows of D at strides
// ks, vs (a bf16/fp16 cache is widened KEY_TILE rows at a time into `tile`); y: G rows of D at stride yh;
// s: scratch of G·L floats.
using Vec = at::vec::Vectorized<float>;
constexpr int64_t KEY_TILE = 64;  // keys widened per step for a half-precision cache

template <typename T>
const float* as_float(const T* src, int64_t rows, int64_t stride, int64_t D, float* tile) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < D; ++d) tile[r * D + d] = static_cast<float>(src[r * stride + d]);
    return tile;
  }
}

template <typename T>
void attend(const float* q, int64_t qh, int64_t G, const T* k, int64_t ks, const T* v, int64_t vs, int64_t L,
            int64_t D, float scale, float* y, int64_t yh, float* s, float* tile) {
  constexpr int64_t W = Vec::size();
  const int64_t Dw = D / W * W, tail = D - Dw;
  const auto dot = [&](const float* a, const float* b) {
    Vec acc(0.f);
    for (int64_t d = 0; d < Dw; d += W) acc = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), acc);
    if (tail) acc = at::vec::fmadd(Vec::loadu(a + Dw, tail), Vec::loadu(b + Dw, tail), acc);
    return at::vec::vec_reduce_all<float>([](Vec x, Vec z) { return x + z; }, acc);
  };
  for (int64_t j0 = 0; j0 < L; j0 += KEY_TILE) {
    const int64_t n = std::min(KEY_TILE, L - j0);
    const float* kt = as_float(k + j0 * ks, n, ks, D, tile);
    const int64_t kst = std::is_same_v<T, float> ? ks : D;
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < G; ++g) s[g * L + j0 + j] = dot(q + g * qh, kt + j * kst) * scale;
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax; a NaN score makes the head's output NaN
    float* sg = s + g * L;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < L; ++j) m = std::isnan(sg[j]) || sg[j] > m ? sg[j] : m;
    Vec sum(0.f);
    int64_t j = 0;
    for (; j + W <= L; j += W) {
      const Vec e = (Vec::loadu(sg + j) - Vec(m)).exp();
      e.store(sg + j);
      sum = sum + e;
    }
    float total = at::vec::vec_reduce_all<float>([](Vec x, Vec z) { return x + z; }, sum);
    for (; j < L; ++j) total += (sg[j] = std::exp(sg[j] - m));
    const float inv = 1.f / total;
    for (j = 0; j < L; ++j) sg[j] *= inv;
    std::fill(y + g * yh, y + g * yh + D, 0.f);
  }
  constexpr int64_t C = 4;  // vectors of a head's output held in registers over every key
  for (int64_t j0 = 0; j0 < L; j0 += KEY_TILE) {
    const int64_t n = std::min(KEY_TILE, L - j0);
    const float* vt = as_float(v + j0 * vs, n, vs, D, tile);
    const int64_t vst = std::is_same_v<T, float> ? vs : D;
    for (int64_t g = 0; g < G; ++g) {
      const float* p = s + g * L + j0;
      float* yg = y + g * yh;
      for (int64_t d0 = 0; d0 < D; d0 += C * W) {
        const int64_t width = std::min(C * W, D - d0);
        Vec acc[C];
        for (int64_t c = 0; c < C; ++c) acc[c] = Vec(0.f);
        if (width == C * W) {
          for (int64_t j = 0; j < n; ++j) {
            const Vec pj(p[j]);
            for (int64_t c = 0; c < C; ++c) acc[c] = at::vec::fmadd(pj, Vec::loadu(vt + j * vst + d0 + c * W), acc[c]);
          }
        } else {
          for (int64_t j = 0; j < n; ++j) {
            const Vec pj(p[j]);
            for (int64_t c = 0; c * W < width; ++c) {
              const int64_t w = std::min(W, width - c * W);
              acc[c] = at::vec::fmadd(pj, Vec::loadu(vt + j * vst + d0 + c * W, w), acc[c]);
            }
          }
        }
        for (int64_t c = 0; c * W < width; ++c) {
          const int64_t w = std::min(W, width - c * W);
          (Vec::loadu(yg + d0 + c * W, w) + acc[c]).store(yg + d0 + c * W, w);
        }
      }
    }
  }
}

void decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t chunks,
                      at::Tensor& y) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat && q.stride(3) == 1,
              "decode_attention: q must be float32 [B, H, 1, D] with D contiguous");
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type() && k.stride(3) == 1 &&
              v.stride(3) == 1, "decode_attention: k and v must be [B, KVH, L, D] of one dtype, D contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && KVH > 0 && H % KVH == 0 && L > 0,
              "decode_attention: k must be [B, KVH, L, D] with H a multiple of KVH and L > 0");
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous() && y.sizes() == q.sizes(),
              "decode_attention: y must be contiguous float32 of q's shape");
  const int64_t G = H / KVH, groups = B * KVH;
  const auto run = [&](auto* kp, auto* vp) {
    at::parallel_for(0, groups, chunks > 1 ? 1 : groups, [&](int64_t begin, int64_t end) {
      std::vector<float> s(G * L), tile(k.scalar_type() == at::kFloat ? 0 : KEY_TILE * D);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / KVH, h = i % KVH;
        attend(q.data_ptr<float>() + b * q.stride(0) + h * G * q.stride(1), q.stride(1), G,
               kp + b * k.stride(0) + h * k.stride(1), k.stride(2), vp + b * v.stride(0) + h * v.stride(1),
               v.stride(2), L, D, static_cast<float>(scale), y.data_ptr<float>() + (b * H + h * G) * D, D, s.data(),
               tile.data());
      }
    });
  };
  switch (k.scalar_type()) {
    case at::kFloat: return run(k.data_ptr<float>(), v.data_ptr<float>());
    case at::kBFloat16: return run(k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>());
    case at::kHalf: return run(k.data_ptr<c10::Half>(), v.data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "decode_attention: k and v must be float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY(zoo_cpu, m) {
  m.def("gather_gemv(Tensor values, Tensor? indices, Tensor wt, Tensor? bias, int chunks, Tensor(a!) y) -> ()");
  m.def("topk_gemv(Tensor x, int k, Tensor wt, Tensor? bias, int chunks, Tensor(a!) y, Tensor(b!) indices) -> ()");
  m.def("ternary_gemv(Tensor x, int k, Tensor w, Tensor beta, Tensor? bias, float eps, int chunks, Tensor(a!) y) -> ()");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale, int chunks, Tensor(a!) y) -> ()");
}
TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("gather_gemv", &gather_gemv);
  m.impl("topk_gemv", &topk_gemv);
  m.impl("ternary_gemv", &ternary_gemv);
  m.impl("decode_attention", &decode_attention);
}
