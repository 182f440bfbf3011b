"""pytest plugin: run OpenRLHF's own test suite with the cfpo patch installed (see test_upstream.py).

OpenRLHF's loss tests do not import ``openrlhf.models.loss``: they load ``models/loss.py`` from the
installed source file into a private package (``_openrlhf_loss_test``), i.e. a second PolicyLoss
class. ``install()`` patches the real module's class; this plugin applies the same patch
(``patch_policy_loss_class``) to every such copy as soon as it is loaded, so the upstream tests run
against the patched class. A counter around the patched ``forward`` proves they went through it;
the report goes to the JSON file named by $CFPO_UPSTREAM_REPORT.
"""

import json
import os
import sys

_report = {"patched_classes": [], "patched_forward_calls": 0}


def _count_calls(cls):
    patched_forward = cls.forward

    def forward(self, *args, **kwargs):
        _report["patched_forward_calls"] += 1
        return patched_forward(self, *args, **kwargs)

    cls.forward = forward


def _patch_loaded_copies():
    from cfpo_loss.adapters.openrlhf import patch_policy_loss_class

    for name, module in list(sys.modules.items()):
        if not name.endswith(".loss") or module is None:
            continue
        cls = vars(module).get("PolicyLoss")  # vars, not getattr: lazy modules import on getattr
        if not (isinstance(cls, type) and cls.__module__ == name):
            continue
        key = f"{name}.PolicyLoss@{id(cls)}"
        if key in _report["patched_classes"]:
            continue
        patch_policy_loss_class(cls)
        _count_calls(cls)
        _report["patched_classes"].append(key)


def pytest_configure(config):
    from cfpo_loss.adapters.openrlhf import install

    install()
    _patch_loaded_copies()


def pytest_collection_finish(session):
    _patch_loaded_copies()


def pytest_runtest_setup(item):
    _patch_loaded_copies()


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("CFPO_UPSTREAM_REPORT")
    if path:
        _report["exitstatus"] = int(exitstatus)
        with open(path, "w") as f:
            json.dump(_report, f, indent=1)
