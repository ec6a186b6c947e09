"""The quantization methods, one module each (config class, weight quantizer, facts; see
qspeech.quant.registry). Importing this package imports every module in it, and each registers itself
(@register): a new method is a module here plus conf/quant/<name>.yaml, nothing else. The built-in ones
register first, in the paper's order (PTQ before QAT); any other module after them, by name."""

import importlib
import pkgutil

BUILTIN = ("rtn", "kmeans", "lsq", "bit")
_found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
for _name in [*BUILTIN, *(n for n in _found if n not in BUILTIN)]:
    importlib.import_module(f"{__name__}.{_name}")
