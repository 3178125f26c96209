"""The Python API: every command is a function of the `featx` package, listed by dir() and __all__, documented with
what it takes and returns, imported on first use (so `import featx` loads neither torch nor scikit-learn), and
still the function after its module of the same name is imported."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import featx
from featx.cli import main

COMMAND_FUNCTIONS = {  # featx COMMAND -> the function of the package that does it
    "layers": "layers", "weights": "weights", "extract": "extract", "info": "open_store", "fit-head": "fit_head",
    "predict": "predict", "evaluate": "evaluate", "neighbors": "neighbors", "finetune": "finetune", "advise": "advise",
    "export": "export",
}


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_command_but_serve_is_a_documented_function():
    assert set(main.commands) - set(COMMAND_FUNCTIONS) == {"serve"}
    for command, name in COMMAND_FUNCTIONS.items():
        assert name in featx.__all__ and name in dir(featx), command
        function = getattr(featx, name)
        doc = inspect.getdoc(function) or ""
        assert callable(function) and "return" in doc.lower(), (name, doc)
        assert f"featx.{name}(" in featx.__doc__, name


def test_import_featx_lists_the_api_without_loading_torch_or_sklearn():
    out = json.loads(run_python(
        "import json, sys, featx\n"
        "print(json.dumps({'dir': dir(featx), 'all': featx.__all__,\n"
        "                  'heavy': sorted({'torch', 'sklearn'} & set(sys.modules))}))"
    ))
    assert out["heavy"] == []
    assert out["dir"] == sorted(out["all"]) and {"layers", "predict", "advise", "evaluate"} <= set(out["dir"])


def test_the_api_functions_stay_functions_after_their_modules_are_imported():
    out = run_python(
        "import featx\n"
        "infos = featx.layers('resnet18', image_size=32)\n"
        "import featx.taps\n"
        "from featx.layer_table import describe_layers, format_layers_table, layers\n"
        "from featx.backbones import load_backbone\n"
        "assert callable(featx.layers) and featx.layers is layers\n"
        "assert infos == describe_layers(load_backbone('resnet18', 'none').model, image_size=32)\n"
        "import featx.advice, featx.heads.prediction\n"
        "from featx.advice import recommend\n"
        "assert featx.advise.__name__ == 'advise' and featx.advice.__name__ == 'featx.advice'\n"
        "assert featx.predict.__module__ == 'featx.head_api'\n"
        "print(format_layers_table(infos).splitlines()[-2])"
    )
    assert out.split()[:3] == ["flatten", "512", "512"]
