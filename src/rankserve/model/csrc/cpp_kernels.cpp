// CPU kernels of the Llama forward. Decode attention over a paged KV cache, reading each block
// where it lies (no gathered copy): one query token per sequence; a KV head's G query heads share
// each key and value row it reads. Residual add + RMS norm, SiLU-and-multiply and RoPE, one pass each.
// Built at first use by torch.utils.cpp_extension (rankserve.model.cpp_kernels), with -march=native.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

// exp(x) for x <= 0 (scores minus their maximum), within 2e-7 relative: Cephes' expf polynomial
// with the power of two set in the exponent bits. Unlike std::exp (a scalar call per score, most of
// this kernel's time), the compiler vectorises it.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Blocks lie scattered through the pool, so the hardware prefetcher cannot guess the next one.
template <typename T>
inline void prefetch_block(const T* block, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(block);
  for (int64_t offset = 0; offset < elements * static_cast<int64_t>(sizeof(T)); offset += 64) __builtin_prefetch(bytes + offset);
}

// kDim: the head size as a compile-time constant (the common ones: the inner loops then unroll
// without run-time trip counts or alias checks, about 2x faster), or 0 for any other size.
template <typename T, int64_t kDim>
void attend(const at::Tensor& q, at::Tensor& kv, const at::Tensor& tables, const at::Tensor& lengths,
            const at::Tensor& new_kv, at::Tensor& out) {
  const int64_t batch = q.size(0), kv_heads = q.size(1), group = q.size(2), dim = kDim > 0 ? kDim : q.size(3);
  const int64_t pool_blocks = kv.size(2), block_size = kv.size(3), max_blocks = tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  T* k_ptr = kv.data_ptr<T>();
  T* v_ptr = k_ptr + kv_heads * pool_blocks * block_size * dim;  // kv[1]
  const T* new_ptr = new_kv.defined() ? new_kv.data_ptr<T>() : nullptr;  // [2, B, KV, D]
  const int64_t* table_ptr = tables.data_ptr<int64_t>();
  const int64_t* length_ptr = lengths.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));

  // One task per (sequence, KV head): its G query rows against that head's blocks.
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query_buffer(group * dim), acc_buffer(group * dim), row_buffer(dim), scores;
    float* __restrict query = query_buffer.data();
    float* __restrict acc = acc_buffer.data();
    float* __restrict row = row_buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / kv_heads, head = task % kv_heads, length = length_ptr[seq];
      const int64_t* table = table_ptr + seq * max_blocks;
      if (new_ptr != nullptr) {  // this step's key and value first: the reads below fetch that block anyway
        const int64_t last = length - 1;
        const int64_t slot = ((head * pool_blocks + table[last / block_size]) * block_size + last % block_size) * dim;
        std::copy_n(new_ptr + task * dim, dim, k_ptr + slot);
        std::copy_n(new_ptr + (batch * kv_heads + task) * dim, dim, v_ptr + slot);
      }
      for (int64_t i = 0; i < group * dim; ++i) query[i] = static_cast<float>(q_ptr[task * group * dim + i]) * scale;
      scores.assign(group * length, 0.0f);  // [G][length]
      for (int64_t start = 0, b = 0; start < length; start += block_size, ++b) {
        const T* block = k_ptr + (head * pool_blocks + table[b]) * block_size * dim;
        const int64_t rows = std::min(block_size, length - start);
        if (start + block_size < length) prefetch_block(k_ptr + (head * pool_blocks + table[b + 1]) * block_size * dim, block_size * dim);
        for (int64_t t = 0; t < rows; ++t) {
          for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<float>(block[t * dim + d]);  // once for G heads
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = query + g * dim;
            float dot = 0.0f;
            for (int64_t d = 0; d < dim; ++d) dot += qg[d] * row[d];
            scores[g * length + start + t] = dot;
          }
        }
      }
      std::vector<float> inverse_sum(group);
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        float peak = s[0];
        for (int64_t t = 1; t < length; ++t) peak = std::max(peak, s[t]);
        for (int64_t t = 0; t < length; ++t) s[t] = exp_nonpositive(s[t] - peak);
        float sum = 0.0f;
        for (int64_t t = 0; t < length; ++t) sum += s[t];
        inverse_sum[g] = 1.0f / sum;
      }
      std::fill(acc, acc + group * dim, 0.0f);
      for (int64_t start = 0, b = 0; start < length; start += block_size, ++b) {
        const T* block = v_ptr + (head * pool_blocks + table[b]) * block_size * dim;
        const int64_t rows = std::min(block_size, length - start);
        if (start + block_size < length) prefetch_block(v_ptr + (head * pool_blocks + table[b + 1]) * block_size * dim, block_size * dim);
        for (int64_t t = 0; t < rows; ++t) {
          for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<float>(block[t * dim + d]);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * length + start + t];
            float* a = acc + g * dim;
            for (int64_t d = 0; d < dim; ++d) a[d] += p * row[d];
          }
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d)
          out_ptr[task * group * dim + g * dim + d] = static_cast<T>(acc[g * dim + d] * inverse_sum[g]);
    }
  });
}

// q [B, KV, G, D]; kv [2, KV, pool_blocks, block_size, D] (one layer's pool); tables [B, max_blocks]
// int64; lengths [B] int64 (context tokens, at least 1). new_kv, if given, [2, B, KV, D]: this
// step's key and value of each sequence, written to its cache slot (position length - 1) before it
// is read. Returns [B, KV, G, D] in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, at::Tensor& kv, const at::Tensor& tables,
                                  const at::Tensor& lengths, const std::optional<at::Tensor>& new_kv) {
  TORCH_CHECK(q.dim() == 4 && kv.dim() == 5 && kv.size(0) == 2, "q must be [B, KV, G, D], kv [2, KV, blocks, bs, D]");
  TORCH_CHECK(q.size(1) == kv.size(1) && q.size(3) == kv.size(4), "q and kv disagree on heads or head size");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must share a dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "tables and lengths must be int64");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && lengths.numel() == q.size(0),
              "one table row and one length per sequence");
  TORCH_CHECK(kv.is_contiguous(), "kv must be contiguous");
  const auto lengths_c = lengths.contiguous();
  TORCH_CHECK(lengths_c.numel() == 0 || (lengths_c.min().item<int64_t>() >= 1 &&
              lengths_c.max().item<int64_t>() <= tables.size(1) * kv.size(3)), "lengths must fit the block tables");
  TORCH_CHECK(tables.numel() == 0 || (tables.min().item<int64_t>() >= 0 &&
              tables.max().item<int64_t>() < kv.size(2)), "block tables must index the pool");
  at::Tensor new_c;
  if (new_kv.has_value()) {
    new_c = new_kv->contiguous();
    TORCH_CHECK(new_c.dim() == 4 && new_c.size(0) == 2 && new_c.size(1) == q.size(0) && new_c.size(2) == q.size(1) &&
                new_c.size(3) == q.size(3) && new_c.scalar_type() == kv.scalar_type(),
                "new_kv must be [2, B, KV, D] in the pool's dtype");
  }
  const auto q_c = q.contiguous();
  const auto tables_c = tables.contiguous();
  auto out = at::empty_like(q_c);
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat, "only float32 and bfloat16 are supported");
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  switch (q.size(3)) {
    case 64:
      bf16 ? attend<c10::BFloat16, 64>(q_c, kv, tables_c, lengths_c, new_c, out) : attend<float, 64>(q_c, kv, tables_c, lengths_c, new_c, out);
      break;
    case 128:
      bf16 ? attend<c10::BFloat16, 128>(q_c, kv, tables_c, lengths_c, new_c, out) : attend<float, 128>(q_c, kv, tables_c, lengths_c, new_c, out);
      break;
    default:
      bf16 ? attend<c10::BFloat16, 0>(q_c, kv, tables_c, lengths_c, new_c, out) : attend<float, 0>(q_c, kv, tables_c, lengths_c, new_c, out);
  }
  return out;
}

// The norm and the MLP activation of a layer, each one pass over memory instead of torch's chain of
// elementwise ops (a prefill step of 2,048 tokens spent a quarter of its time in them). Rounded to
// the model's dtype where torch's chain rounds, so the results differ from it only in the order of
// the sum of squares.

template <typename T>
void add_rms_norm_rows(const T* x, const T* residual, const T* weight, T* sum_out, T* norm_out, int64_t rows,
                       int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(hidden);
    float* __restrict h = buffer.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      float squares = 0.0f;
      for (int64_t i = 0; i < hidden; ++i) {
        // x + residual, rounded to T as torch's add rounds it
        const float v = residual != nullptr ? static_cast<float>(static_cast<T>(static_cast<float>(xr[i]) +
                                                                                  static_cast<float>(residual[r * hidden + i])))
                                            : static_cast<float>(xr[i]);
        h[i] = v;
        squares += v * v;
      }
      if (sum_out != nullptr)
        for (int64_t i = 0; i < hidden; ++i) sum_out[r * hidden + i] = static_cast<T>(h[i]);
      const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
      for (int64_t i = 0; i < hidden; ++i)
        norm_out[r * hidden + i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(static_cast<T>(h[i] * inverse)));
    }
  });
}

// x [T, hidden] (+ residual [T, hidden], if given), RMS-normalised and scaled by weight [hidden].
// Returns (x + residual, its norm); without a residual the first is x itself.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x must be [T, hidden], weight [hidden]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must share a dtype");
  TORCH_CHECK(!residual.has_value() || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type()),
              "residual must be shaped and typed as x");
  const auto x_c = x.contiguous(), weight_c = weight.contiguous();
  const auto residual_c = residual.has_value() ? residual->contiguous() : at::Tensor();
  auto sum = residual.has_value() ? at::empty_like(x_c) : x_c;
  auto norm = at::empty_like(x_c);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_rows<scalar_t>(x_c.data_ptr<scalar_t>(), residual.has_value() ? residual_c.data_ptr<scalar_t>() : nullptr,
                                weight_c.data_ptr<scalar_t>(), residual.has_value() ? sum.data_ptr<scalar_t>() : nullptr,
                                norm.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return {sum, norm};
}

// silu(gate) * up for gate_up [T, 2I] (gate first). Returns [T, I].
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2I]");
  const auto in = gate_up.contiguous();
  const int64_t rows = in.size(0), width = in.size(1) / 2;
  auto out = at::empty({rows, width}, in.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, in.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = src + r * 2 * width;
        const scalar_t* up = gate + width;
        for (int64_t i = 0; i < width; ++i) {
          const float g = static_cast<float>(gate[i]);
          const float e = exp_nonpositive(-std::abs(g));  // sigmoid from exp(-|g|): no overflow
          const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
          const float silu = static_cast<float>(static_cast<scalar_t>(g * sigmoid));  // rounded as torch's silu
          dst[r * width + i] = static_cast<scalar_t>(silu * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

// RoPE on the query and key heads of a layer's fused projection, in place: the first `heads` heads
// of each row of qkv [T, ...] (queries, then keys; their dims paired side by side, see llama's
// _pair_rows) rotated by rotation [T, D/2, 2] (cos, sin). One pass instead of torch's four
// (to float, complex multiply, back, and a copy per q and k); computed in float and rounded once,
// as torch's chain is.
at::Tensor& rope_(at::Tensor& qkv, const at::Tensor& rotation, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous(), "qkv must be a contiguous [T, width]");
  TORCH_CHECK(rotation.dim() == 3 && rotation.size(0) == qkv.size(0) && rotation.size(2) == 2 &&
                  rotation.scalar_type() == at::kFloat, "rotation must be float [T, D/2, 2]");
  const int64_t rows = qkv.size(0), half = rotation.size(1), width = qkv.size(1);
  TORCH_CHECK(heads > 0 && heads * 2 * half <= width, "heads * D exceeds the row");
  const auto rot = rotation.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_", [&] {
    scalar_t* data = qkv.data_ptr<scalar_t>();
    const float* angles = rot.data_ptr<float>();
    at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* cs = angles + r * half * 2;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* x = data + r * width + h * 2 * half;
          for (int64_t j = 0; j < half; ++j) {
            const float a = static_cast<float>(x[2 * j]), b = static_cast<float>(x[2 * j + 1]);
            const float c = cs[2 * j], sn = cs[2 * j + 1];
            x[2 * j] = static_cast<scalar_t>(a * c - b * sn);
            x[2 * j + 1] = static_cast<scalar_t>(a * sn + b * c);
          }
        }
      }
    });
  });
  return qkv;
}

}  // namespace

TORCH_LIBRARY(rankserve, m) {
  m.def("paged_decode_attention(Tensor q, Tensor(a!) kv, Tensor tables, Tensor lengths, Tensor? new_kv=None) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rope_(Tensor(a!) qkv, Tensor rotation, int heads) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(rankserve, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rope_", &rope_);
}
