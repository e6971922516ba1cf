from setuptools import find_packages, setup


def requirements() -> list[str]:
    with open("requirements.txt") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


setup(
    name="llama",
    version="0.1.0",
    description="Pure-PyTorch reference inference for Llama 3 / 3.1 checkpoints",
    packages=find_packages(include=["llama", "llama.*"]),
    package_data={"llama": ["csrc/*.c", "csrc/*.h"]},  # the native kernels' sources, compiled on first use
    python_requires=">=3.10",
    install_requires=requirements(),
    license="MIT",
)
