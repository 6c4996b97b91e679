"""Names and defaults that more than one module (or the CLI's help) uses, each defined here once.

Data only, like gguf-py's constants.py: this module imports nothing, so the CLI can read its defaults without
loading torch, transformers or even gguf-py.
"""

# ---------------------------------------------------------------- GGUF tensor names
# gguf-py's TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD / OUTPUT] + ".weight" (tests/test_constants.py holds them equal)
TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT_HEAD = "output.weight"

# ---------------------------------------------------------------- metadata keys we write
# Into every converted file: enough to print the plan back (inspect) and to reuse it (convert --plan FILE.gguf).
KEY_EWQ_VERSION = "ewq.version"
KEY_EWQ_METHOD = "ewq.method"
KEY_EWQ_PARAMS = "ewq.params"
KEY_EWQ_PLAN = "ewq.plan"
# Into importance matrices, in llama-imatrix's GGUF format (llama.cpp's tools/imatrix/imatrix.cpp): general.type
# says what the file is; per weight NAME, two tensors NAME + the suffixes below.
IMATRIX_FILE_TYPE = "imatrix"
KEY_IMATRIX_DATASETS = "imatrix.datasets"
KEY_IMATRIX_CHUNK_COUNT = "imatrix.chunk_count"
KEY_IMATRIX_CHUNK_SIZE = "imatrix.chunk_size"
IMATRIX_SUMS_SUFFIX = ".in_sum2"
IMATRIX_COUNTS_SUFFIX = ".counts"

# ---------------------------------------------------------------- types of the tier planners (EWQ, FastEWQ, ZD, LIM)
DEFAULT_TIER_TYPES = "Q4_K,Q8_0,F16"    # LOW,MID,HIGH
# near lossless at 8.5 bits per weight, the choice llama.cpp's own mixes never go below for small models' output
DEFAULT_EMBED_TYPE = "Q8_0"
DEFAULT_OUTPUT_TYPE = "Q8_0"

# ---------------------------------------------------------------- calibration (`ewq-gguf calibrate`)
DEFAULT_CALIBRATION_TOKENS = 32768
DEFAULT_CALIBRATION_CTX = 512
SENSITIVITY_METHODS = ("fisher", "noise")
DEFAULT_SENSITIVITY_METHOD = "fisher"
# how codes are chosen in each type: ggml's nearest rounding, or GPTQ over the inputs of this many calibration tokens
ROUNDINGS = ("nearest", "gptq")
DEFAULT_ROUNDING = "nearest"
DEFAULT_GPTQ_TOKENS = DEFAULT_CALIBRATION_TOKENS
# tokens the sensitivities rest on, per method: a backward pass per chunk is cheap enough for thousands of tokens;
# noise injection runs the rest of the model once per weight and noise level
DEFAULT_SENSITIVITY_TOKENS = {"fisher": 4096, "noise": 128}
DEFAULT_NOISE_LEVELS = (0.05, 0.1)      # relative noise sizes t the sensitivity slope is fitted over
# noise-injection sequences are short: every position counts as a sample, and attention over 128 tokens is cheap
NOISE_SEQUENCE = 128
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")

# ---------------------------------------------------------------- evaluation (perplexity, compare, --validate)
DEFAULT_EVALUATION_CTX = 512

# ---------------------------------------------------------------- devices
DEVICE_CHOICES = ("auto", "cpu", "cuda")
