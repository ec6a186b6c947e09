"""The upstream architectures, one module each (an Architecture subclass registered with @register; see
qspeech.upstream.registry). Importing this package imports every module in it, and each registers itself: a
new architecture is a module here plus conf/model/<name>.yaml, nothing else. The built-in ones register
first, in this order (ModelConfig's `arch` choices); any other module after them, by name."""

import importlib
import pkgutil

BUILTIN = ("hubert", "wav2vec2", "distiller", "wavlm", "fbank")
_found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
for _name in [*BUILTIN, *(n for n in _found if n not in BUILTIN)]:
    importlib.import_module(f"{__name__}.{_name}")
