"""Only what pyproject.toml cannot say: conf/ stays at the top of the repository (Hydra's layout, and the
design card's) and ships inside the wheel as qspeech/conf, where qspeech.config.CONF_DIR finds it."""

from setuptools import find_namespace_packages, setup

CONF = ["qspeech.conf", *(f"qspeech.conf.{group}" for group in find_namespace_packages("conf"))]

setup(
    # namespace search: qspeech/assets (data only) is a package too, so its files ship as package data
    packages=[*find_namespace_packages(include=["qspeech*"], exclude=["*__pycache__"]), *CONF],
    package_dir={"qspeech.conf": "conf"},
    package_data={"qspeech.assets": ["*"], **{p: ["*.yaml"] for p in CONF}},
)
