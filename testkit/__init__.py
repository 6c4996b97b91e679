"""Fixtures shared by the tests and the scripts, importable from the repository root (pytest puts it on sys.path;
`python -m scripts.GROUP.NAME` runs from it): tiny random checkpoints and tokenizers made on the fly (tiny_models,
tiny_tokenizers), and where the development model and llama.cpp's tools are found (resources: a skip when absent,
a failure under CI=true)."""
