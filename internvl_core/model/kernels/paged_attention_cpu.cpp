// Paged attention on the CPU: every query row of a mixed batch (decodes, prefill chunks, prefix
// hits) attends over its sequence's keys read in place from the block pool, in one call per layer.
//
// q [T, H, d] float32, kv_cache [2, num_blocks, block_size, K, d] float32 (already holding this
// step's K/V), for S sequences: block_tables [S, W], query_start [S], query_lens [S], seq_lens [S]
// (int64, all on the CPU) -> writes out [T, H, d] at the S sequences' rows only (other rows are
// left to another path). Query row i of sequence s is q row query_start[s] + i, at position
// seq_lens[s] - query_lens[s] + i, and attends causally to positions 0..itself (H a multiple of K).
//
// Work: one job per (sequence, tile of up to kTileRows query rows, KV head); each job keeps the
// tile's rows x G query heads in registers/L1 and streams the sequence's keys and values block by
// block with an online softmax (running max, rescaled accumulators), so each key and value is
// read once per tile. Scores of 16 keys at a time come from the keys transposed into a small
// [d, 16] buffer and one broadcast FMA per head_dim element (no horizontal sums). Jobs are sorted longest first and taken from an atomic counter by the
// OpenMP threads (torch's own libgomp): no job waits behind a long sequence on a busy thread.
// Loops over head_dim carry `omp simd` pragmas (compiled with -fopenmp-simd -O3 -march=native);
// exp is a polynomial that vectorises (relative error ~2e-7).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;  // query rows of one sequence sharing a pass over its keys
constexpr int64_t kKeys = 16;      // keys scored together: one 16-float vector per query row
constexpr int64_t kTransposeRows = 8;
constexpr int64_t kMaxRows = 256;  // tile rows x query heads per KV head, at most
constexpr int64_t kMaxHeadDim = 512;  // bound checked on entry; accumulators are heap rows

// e^x for x <= 0 (scores minus their running max): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // Round x / ln2 to the nearest integer by adding and removing 1.5 * 2^23 (plain float adds, so
  // the loop vectorises; no libm call).
  constexpr float kShift = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kShift) - kShift;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

struct Job {
  int64_t seq;
  int64_t first_row;  // within the sequence's query rows
  int64_t num_rows;
  int64_t kv_head;
  int64_t cost;  // keys read x rows, for the longest-first order
};

struct Layout {
  const float* q;
  const float* keys;    // cache[0]: [num_blocks, block_size, K, d]
  const float* values;  // cache[1]
  const int64_t* tables;
  const int64_t* query_start;
  const int64_t* query_lens;
  const int64_t* seq_lens;
  float* out;
  int64_t heads, kv_heads, head_dim, block_size, table_width;
  float scale;
};

// kHeadDim > 0: head_dim known at compile time (fully unrolled vector loops); 0: L.head_dim.
template <int64_t kHeadDim>
void run_job(const Layout& L, const Job& job) {
  const int64_t d = kHeadDim > 0 ? kHeadDim : L.head_dim;
  const int64_t group = L.heads / L.kv_heads;
  const int64_t q_len = L.query_lens[job.seq];
  const int64_t seq_len = L.seq_lens[job.seq];
  const int64_t first_pos = seq_len - q_len + job.first_row;  // position of the tile's row 0
  const int64_t num_keys = first_pos + job.num_rows;          // keys the tile's last row sees
  const int64_t rows = job.num_rows * group;                  // (tile row, query head) pairs
  const int64_t* table = L.tables + job.seq * L.table_width;
  const int64_t token_stride = L.kv_heads * d;  // floats between two slots of a block

  thread_local std::vector<float> acc_buf, score_buf, key_buf;
  acc_buf.assign(rows * d, 0.0f);
  score_buf.resize(rows * kKeys);
  key_buf.resize(d * kKeys);
  float* acc = acc_buf.data();
  float* scores = score_buf.data();  // [rows, kKeys] softmax numerators of the current chunk
  float* keys_t = key_buf.data();    // [d, kKeys] the chunk's keys, transposed
  float row_max[kMaxRows], row_sum[kMaxRows];
  const float* qrow[kMaxRows];
  int64_t row_limit[kMaxRows];  // keys visible to the row (causal)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile_row = r / group, head = job.kv_head * group + r % group;
    const int64_t token = L.query_start[job.seq] + job.first_row + tile_row;
    qrow[r] = L.q + (token * L.heads + head) * d;
    row_limit[r] = first_pos + tile_row + 1;
    row_max[r] = -std::numeric_limits<float>::infinity();
    row_sum[r] = 0.0f;
  }
  // Few rows (decodes): plain dot products; many rows (prefill tiles): transposing the chunk's
  // keys once pays for itself.
  const bool transpose = rows >= kTransposeRows;
  const int64_t num_blocks = (num_keys + L.block_size - 1) / L.block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t block_start = b * L.block_size;
    const int64_t block_count = std::min(L.block_size, num_keys - block_start);
    const int64_t base = (table[b] * L.block_size * L.kv_heads + job.kv_head) * d;
    for (int64_t c0 = 0; c0 < block_count; c0 += kKeys) {
      // A chunk of up to kKeys keys: scores of every row by broadcast FMAs over head_dim into one
      // kKeys-wide vector (no horizontal sums), then the online-softmax update and P @ V.
      const int64_t start = block_start + c0;
      const int64_t count = std::min(kKeys, block_count - c0);
      const float* kchunk = L.keys + base + c0 * token_stride;
      const float* vchunk = L.values + base + c0 * token_stride;
      for (int64_t t = 0; transpose && t < kKeys; ++t) {
        const float* key = kchunk + t * token_stride;
        if (t < count) {
          for (int64_t i = 0; i < d; ++i) keys_t[i * kKeys + t] = key[i];
        } else {
          for (int64_t i = 0; i < d; ++i) keys_t[i * kKeys + t] = 0.0f;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t visible = std::min(count, row_limit[r] - start);  // may be <= 0
        float* p = scores + r * kKeys;
        if (visible <= 0) {
          for (int64_t t = 0; t < kKeys; ++t) p[t] = 0.0f;
          continue;
        }
        alignas(64) float s[kKeys] = {};
        const float* qr = qrow[r];
        if (transpose) {
          for (int64_t i = 0; i < d; ++i) {
            const float qi = qr[i];
            const float* kt = keys_t + i * kKeys;
#pragma omp simd
            for (int64_t t = 0; t < kKeys; ++t) s[t] += qi * kt[t];
          }
        } else {
          for (int64_t t = 0; t < visible; ++t) s[t] = dot(qr, kchunk + t * token_stride, d);
        }
        float chunk_max = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < visible; ++t) {
          s[t] *= L.scale;
          chunk_max = std::max(chunk_max, s[t]);
        }
        const float new_max = std::max(row_max[r], chunk_max);
        const float correction = exp_nonpositive(row_max[r] - new_max);  // ~0 on the first chunk
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < kKeys; ++t) {
          const float e = exp_nonpositive(s[t] - new_max);
          p[t] = t < visible ? e : 0.0f;
          sum += p[t];
        }
        row_sum[r] = row_sum[r] * correction + sum;
        row_max[r] = new_max;
        if (correction != 1.0f) {
          float* a = acc + r * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] *= correction;
        }
      }
      for (int64_t t = 0; t < count; ++t) {
        const float* v = vchunk + t * token_stride;
        for (int64_t r = 0; r < rows; ++r) {
          const float w = scores[r * kKeys + t];
          if (w == 0.0f) continue;
          float* a = acc + r * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += w * v[i];
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile_row = r / group, head = job.kv_head * group + r % group;
    const int64_t token = L.query_start[job.seq] + job.first_row + tile_row;
    float* o = L.out + (token * L.heads + head) * d;
    const float inv = 1.0f / row_sum[r];
    const float* a = acc + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = a[i] * inv;
  }
}

void paged_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                     const at::Tensor& block_tables, const at::Tensor& query_start,
                     const at::Tensor& query_lens, const at::Tensor& seq_lens, double scale,
                     const at::Tensor& out) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv_cache.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "q [T, H, d], kv_cache [2, num_blocks, block_size, K, d]");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && block_tables.is_contiguous() &&
                  query_start.is_contiguous() && query_lens.is_contiguous() &&
                  seq_lens.is_contiguous() && out.is_contiguous(),
              "contiguous inputs");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == at::kFloat, "out like q");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && query_start.scalar_type() == at::kLong &&
                  query_lens.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "int64 index tensors");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == head_dim && heads % kv_heads == 0, "H a multiple of K");
  TORCH_CHECK(head_dim <= kMaxHeadDim && heads / kv_heads <= kMaxRows,
              "head_dim or query group too large");
  const int64_t tile_rows = std::min(kTileRows, kMaxRows / (heads / kv_heads));
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start.size(0) == num_seqs && query_lens.size(0) == num_seqs &&
                  block_tables.size(0) == num_seqs,
              "one block table and one query span per sequence");
  Layout L{q.data_ptr<float>(),
           kv_cache.data_ptr<float>(),
           kv_cache.data_ptr<float>() + kv_cache.stride(0),
           block_tables.data_ptr<int64_t>(),
           query_start.data_ptr<int64_t>(),
           query_lens.data_ptr<int64_t>(),
           seq_lens.data_ptr<int64_t>(),
           out.data_ptr<float>(),
           heads,
           kv_heads,
           head_dim,
           kv_cache.size(2),
           block_tables.size(1),
           static_cast<float>(scale)};
  std::vector<Job> jobs;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = L.query_lens[s];
    TORCH_CHECK(q_len >= 1 && q_len <= L.seq_lens[s], "1 <= query_len <= seq_len");
    TORCH_CHECK(L.query_start[s] >= 0 && L.query_start[s] + q_len <= q.size(0), "rows within q");
    const int64_t used_blocks = (L.seq_lens[s] + L.block_size - 1) / L.block_size;
    TORCH_CHECK(used_blocks <= L.table_width, "block table narrower than the sequence");
    for (int64_t b = 0; b < used_blocks; ++b) {
      const int64_t block = L.tables[s * L.table_width + b];
      TORCH_CHECK(block >= 0 && block < kv_cache.size(1), "block id outside the pool");
    }
    for (int64_t first = 0; first < q_len; first += tile_rows) {
      const int64_t n = std::min(tile_rows, q_len - first);
      const int64_t keys = L.seq_lens[s] - q_len + first + n;
      for (int64_t h = 0; h < kv_heads; ++h) jobs.push_back({s, first, n, h, keys * n});
    }
  }
  std::stable_sort(jobs.begin(), jobs.end(),
                   [](const Job& a, const Job& b) { return a.cost > b.cost; });
  void (*run)(const Layout&, const Job&) = run_job<0>;
  switch (head_dim) {
    case 32: run = run_job<32>; break;
    case 64: run = run_job<64>; break;
    case 80: run = run_job<80>; break;
    case 96: run = run_job<96>; break;
    case 128: run = run_job<128>; break;
    default: break;
  }
  std::atomic<int64_t> next{0};
  const int64_t total = static_cast<int64_t>(jobs.size());
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), total));
#pragma omp parallel num_threads(threads)
  {
    for (int64_t j = next.fetch_add(1); j < total; j = next.fetch_add(1)) run(L, jobs[j]);
  }
}

}  // namespace

TORCH_LIBRARY(internvl_cpu, m) {
  m.def(
      "paged_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor query_start, "
      "Tensor query_lens, Tensor seq_lens, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(internvl_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
