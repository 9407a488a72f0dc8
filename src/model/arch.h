// One file per architecture: each turns a batch's tokens into final normalized hidden states,
// computing and storing every layer's K/V on the way.
#pragma once

#include "model/batch.h"
#include "model/weights.h"

namespace backprompt::detail {

// x: [n_rows][n_embd], written with the final-norm hidden state of every row.
void gpt2_hidden(const ModelImpl& m, const Batch& b, float* x);
void llama_hidden(const ModelImpl& m, const Batch& b, float* x);

}  // namespace backprompt::detail
