"""tunedeck core: project files, models, datasets, training, chat. No Textual here."""

import os as _os

__version__ = "0.1.0"

# Offline unless asked: every tunedeck process imports this package before any Hugging Face
# library, so these are in place when huggingface_hub reads them (at its import). Nothing
# tunedeck does while training, inspecting, previewing or chatting needs the network; a
# user who sets one of them (e.g. HF_HUB_OFFLINE=0 for a download) keeps their value.
# whether the user set HF_HUB_OFFLINE themselves (tunedeck's own search and pull lift only its default);
# the answer of the first tunedeck process is passed on to the processes it starts (engine, trainer)
if "TUNEDECK_HUB_OFFLINE" not in _os.environ:
    _os.environ["TUNEDECK_HUB_OFFLINE"] = (
        "user" if "HF_HUB_OFFLINE" in _os.environ or "TRANSFORMERS_OFFLINE" in _os.environ else "default")
HUB_OFFLINE_FROM_USER = _os.environ["TUNEDECK_HUB_OFFLINE"] == "user"
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
