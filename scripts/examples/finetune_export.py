"""Fine-tune a causal language model for a few SGD steps, then write it to GGUF straight from memory.

    python -m scripts.examples.finetune_export [MODEL_DIR_OR_HUB_ID] [OUT.gguf]

The same code as the README's "Use from Python" section; defaults: HuggingFaceTB/SmolLM2-135M, finetuned.gguf.
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ewq_gguf
from ewq_gguf.plan.display import format_plan_summary

model_dir = sys.argv[1] if len(sys.argv) > 1 else "HuggingFaceTB/SmolLM2-135M"
out = sys.argv[2] if len(sys.argv) > 2 else "finetuned.gguf"

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

# a few plain SGD steps on one sentence: any training loop that leaves a transformers model in memory will do
batch = tokenizer(["The lighthouse keeper counted the ships every evening and wrote each number down."],
                  return_tensors="pt")
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
model.train()
for step in range(3):
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")
model.eval()

# no save_pretrained folder: the tensors go from the model to the GGUF file, planned by EWQ
result = ewq_gguf.export(model, tokenizer, out, method="ewq", force=True)
print(f"wrote {result.path}: {result.bytes:,} bytes, {result.bits_per_weight:.2f} bits per weight, "
      f"{result.seconds:.1f} s")
print(format_plan_summary(result.plan))
