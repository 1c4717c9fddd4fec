"""The engine: a long-lived helper process for the work that needs torch.

- :mod:`~tunedeck.core.engine.client`: :class:`EngineClient`, in the UI process (and the
  CLI): starts the engine on first need, sends requests, routes the replies;
- :mod:`~tunedeck.core.engine.calls`: every request as a typed call
  (:class:`~tunedeck.core.engine.calls.EngineCalls`, which the client and the tests'
  in-process engines share), with results typed in :mod:`~tunedeck.core.engine.results`;
- :mod:`~tunedeck.core.engine.server`: the engine process's loop and its lanes (a long
  merge or export never holds up an inspection or a preview);
- :mod:`~tunedeck.core.engine.ops`: what a request may ask, one function each.

Importing this package imports neither torch nor any model library.
"""

from __future__ import annotations

from .calls import EngineCalls, EngineError
from .client import EngineClient
from .ops import hardware_arg

__all__ = ["EngineCalls", "EngineClient", "EngineError", "hardware_arg"]
