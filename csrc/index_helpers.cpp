// Index builders for GPT training samples: loops over documents that numpy cannot vectorize well.
//
// build_sample_idx: where each fixed-length sample starts, as (position in doc_idx, token offset).
// build_blending_indices: which dataset, and which of its samples, each blended sample comes from.
// megaphi/data/index_helpers.py holds a numpy twin of each; the tests check that both agree exactly.
// Plain pybind11, no torch headers.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using i32_array = py::array_t<int32_t, py::array::c_style>;
using f64_array = py::array_t<double, py::array::c_style>;

int64_t num_samples_for(int64_t total_tokens, int64_t seq_length, bool drop_last_partial, int64_t extra) {
  const int64_t usable = total_tokens - extra;
  return drop_last_partial ? usable / seq_length : (usable + seq_length - 1) / seq_length;
}

// Shapes: sizes [num_sequences], doc_idx [num_docs_over_all_epochs], out [(num_samples + 1) * 2].
// Row s of out is where sample s starts; sample s reads up to row s + 1's offset plus `extra` tokens.
template <typename T>
void fill_sample_idx(const int32_t* sizes, int64_t num_sizes, const int32_t* doc_idx, int64_t num_docs,
                     int64_t seq_length, int64_t num_samples, int64_t extra, T* out) {
  int64_t doc = 0;     // position in doc_idx
  int64_t offset = 0;  // token offset inside that document
  out[0] = 0;
  out[1] = 0;
  for (int64_t s = 1; s <= num_samples; ++s) {
    // The sample spans seq_length + extra tokens, the next one starts seq_length tokens later.
    int64_t remaining = seq_length + extra;
    while (true) {
      const int64_t seq_id = doc_idx[doc];
      if (seq_id < 0 || seq_id >= num_sizes) throw std::invalid_argument("doc_idx holds an id outside sizes");
      const int64_t left_in_doc = sizes[seq_id] - offset;
      if (left_in_doc >= remaining) {
        offset += remaining - extra;
        break;
      }
      remaining -= left_in_doc;
      if (doc == num_docs - 1) {
        // Out of tokens: only the last, partial sample (drop_last_partial=false) may end here.
        if (s != num_samples) {
          throw std::invalid_argument("num_epochs * tokens_per_epoch exceeds the tokens in doc_idx");
        }
        offset = sizes[seq_id] - extra;
        break;
      }
      ++doc;
      offset = 0;
    }
    out[2 * s] = static_cast<T>(doc);
    out[2 * s + 1] = static_cast<T>(offset);
  }
}

template <typename T>
py::array build_sample_idx_typed(const int32_t* sizes, int64_t num_sizes, const int32_t* doc_idx, int64_t num_docs,
                                 int64_t seq_length, int64_t num_samples, int64_t extra) {
  py::array_t<T> out({num_samples + 1, int64_t{2}});
  T* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    fill_sample_idx<T>(sizes, num_sizes, doc_idx, num_docs, seq_length, num_samples, extra, data);
  }
  return std::move(out);
}

py::array build_sample_idx(const i32_array& sizes, const i32_array& doc_idx, int64_t seq_length, int64_t num_epochs,
                           int64_t tokens_per_epoch, bool drop_last_partial, int64_t add_extra_token, bool use_int32) {
  if (sizes.ndim() != 1 || doc_idx.ndim() != 1) throw std::invalid_argument("sizes and doc_idx must be 1-D");
  if (doc_idx.shape(0) == 0) throw std::invalid_argument("doc_idx is empty");
  if (seq_length < 1) throw std::invalid_argument("seq_length must be >= 1");
  if (num_epochs < 1) throw std::invalid_argument("num_epochs must be >= 1");
  if (tokens_per_epoch < 1) throw std::invalid_argument("tokens_per_epoch must be >= 1");
  if (add_extra_token != 0 && add_extra_token != 1) throw std::invalid_argument("add_extra_token must be 0 or 1");
  if (tokens_per_epoch > std::numeric_limits<int64_t>::max() / num_epochs) {
    throw std::invalid_argument("num_epochs * tokens_per_epoch overflows int64");
  }
  const int64_t num_samples = num_samples_for(num_epochs * tokens_per_epoch, seq_length, drop_last_partial,
                                              add_extra_token);
  if (use_int32 && doc_idx.shape(0) > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("use_int32 with more than 2^31 - 1 documents in doc_idx");
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    return build_sample_idx_typed<T>(sizes.data(), sizes.shape(0), doc_idx.data(), doc_idx.shape(0), seq_length,
                                     num_samples, add_extra_token);
  };
  return use_int32 ? run(int32_t{}) : run(int64_t{});
}

// Separate multiply and subtract (no fused multiply-add) so the result matches numpy bit for bit.
#if defined(__clang__)
#define MEGAPHI_NO_FMA _Pragma("clang fp contract(off)")
#define MEGAPHI_NO_FMA_ATTR
#elif defined(__GNUC__)
#define MEGAPHI_NO_FMA
#define MEGAPHI_NO_FMA_ATTR __attribute__((optimize("fp-contract=off")))
#else
#define MEGAPHI_NO_FMA
#define MEGAPHI_NO_FMA_ATTR
#endif

// Greedy blending: blended sample i goes to the dataset furthest behind its share,
// argmax_d weights[d] * max(i, 1) - counts[d], first dataset on ties.
MEGAPHI_NO_FMA_ATTR void fill_blending(const double* weights, int64_t num_datasets, int64_t size,
                                       int16_t* dataset_index, int64_t* dataset_sample_index) {
  MEGAPHI_NO_FMA
  std::vector<int64_t> counts(num_datasets, 0);
  for (int64_t i = 0; i < size; ++i) {
    const double x = i > 1 ? static_cast<double>(i) : 1.0;
    int64_t best = 0;
    double best_error = weights[0] * x - static_cast<double>(counts[0]);
    for (int64_t d = 1; d < num_datasets; ++d) {
      const double error = weights[d] * x - static_cast<double>(counts[d]);
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    dataset_index[i] = static_cast<int16_t>(best);
    dataset_sample_index[i] = counts[best]++;
  }
}

py::tuple build_blending_indices(const f64_array& weights, int64_t num_datasets, int64_t size) {
  if (weights.ndim() != 1 || weights.shape(0) != num_datasets) {
    throw std::invalid_argument("weights must be 1-D with num_datasets entries");
  }
  if (num_datasets < 1 || num_datasets > std::numeric_limits<int16_t>::max()) {
    throw std::invalid_argument("num_datasets must be in [1, 32767]");
  }
  if (size < 0) throw std::invalid_argument("size must be >= 0");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  const double* w = weights.data();
  int16_t* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    fill_blending(w, num_datasets, size, di, dsi);
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_index_helpers, m) {
  m.doc() = "C++ index builders for megaphi GPT datasets (see megaphi/data/index_helpers.py)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_epochs"), py::arg("tokens_per_epoch"), py::arg("drop_last_partial"), py::arg("add_extra_token"),
        py::arg("use_int32"),
        "Sample starts [num_samples + 1, 2] as (position in doc_idx, offset), int32 or int64.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("num_datasets"),
        py::arg("size"), "Greedy blend: (dataset_index int16 [size], dataset_sample_index int64 [size]).");
}
