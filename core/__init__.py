"""tunedeck core: project files, models, datasets, training, chat. No Textual here."""

import os as _os

__version__ = "0.1.0"

# Offline unless asked: every tunedeck process imports this package before any Hugging Face
# library, so these are in place when huggingface_hub reads them (at its import). Nothing
# tunedeck does while training, inspecting, previewing or chatting needs the network; a
# user who sets one of them (e.g. HF_HUB_OFFLINE=0 for a download) keeps their value.
# whether the user set HF_HUB_OFFLINE themselves (tunedeck's own search and pull lift only its default):
# tunedeck marks the default it sets, so the processes it starts (engine, trainer), which inherit the
# variable, know it is not the user's
if "HF_HUB_OFFLINE" not in _os.environ and "TRANSFORMERS_OFFLINE" not in _os.environ:
    HUB_OFFLINE_FROM_USER = False
    _os.environ["TUNEDECK_HUB_OFFLINE"] = "default"
else:
    HUB_OFFLINE_FROM_USER = _os.environ.get("TUNEDECK_HUB_OFFLINE") != "default"
for _name, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),  # trl and transformers report usage through huggingface_hub
    ("HF_DATASETS_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_HUB_DISABLE_UPDATE_CHECK", "1"),
    ("DO_NOT_TRACK", "1"),
):
    _os.environ.setdefault(_name, _value)
del _name, _value
