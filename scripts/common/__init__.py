"""What the scripts share: llama_tools runs llama.cpp's tools (and any command) measured; results_file writes
docs/results.md sections and shows paths and commands as that file quotes them."""
