"""llama.cpp's own converter (`python3 convert.py LLAMA_CPP_DIR MODEL_DIR --outfile F --outtype
bf16`), with the tokenizer's pre-tokenizer named "gpt-2": the bundled test tokenizer is not in
its table of known tokenizers, and speed does not depend on it."""
import runpy, sys
root = sys.argv.pop(1)
sys.path.insert(0, root)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path(f"{root}/convert_hf_to_gguf.py", run_name="__main__")
