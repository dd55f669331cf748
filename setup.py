from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["udedup", "udedup.*"]),
    cffi_modules=["udedup/native/build.py:ffibuilder"],
)
