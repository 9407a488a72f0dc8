// backprompt: run language models without ever computing the same attention keys and values twice.
#pragma once

#include "backprompt/cache.h"
#include "backprompt/error.h"
#include "backprompt/model.h"
#include "backprompt/sampling.h"
#include "backprompt/snapshot.h"
#include "backprompt/text.h"
#include "backprompt/tokenizer.h"
