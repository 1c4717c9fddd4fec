"""Keys typed ahead of a text field: kept, in order, and handed to it once it has the focus.

Textual routes a key to the widget focused when the key is read. A key that opens a text
field (enter to edit a value, ``/`` to search, ``g`` to go to a row) moves the focus only
once it is handled, and over SSH a burst of keys arrives in one read: the keys typed after
it reach the old widget, which would take them as its own commands (``n`` next, ``v``
view ...). A widget with :class:`KeysAhead` keeps them and passes them on, in order, to the
widget that has the focus next; if no text field takes the focus within ``HAND_OFF_S``,
they are its own after all.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from textual import events
from textual.widget import Widget

_Base = Widget if TYPE_CHECKING else object


class KeysAhead(_Base):
    """Mixed into a focusable widget (first among its bases) whose keys may open a text
    field (see the module's doc)."""

    HAND_OFF_S = 5.0
    """How long keys typed after a key that opens a text field wait for that field. Only a
    key that was expected to open one and did not waits this long (on a loaded machine a
    field can take more than a second to show); the field taking the focus ends the wait."""

    _ahead: list[tuple[str, str | None]] | None = None  # keys for the text field being opened
    _hand_offs = 0

    def opens_a_text_field(self, key: str) -> bool:
        """Whether ``key``, pressed here, opens a text field that takes the focus."""
        return False

    async def _on_key(self, event: events.Key) -> None:
        if not self.has_focus or self._ahead is not None:
            event.stop()
            event.prevent_default()
            if self.has_focus or self._ahead:
                self._ahead = (self._ahead or []) + [(event.key, event.character)]
            else:
                self._pass_on(event.key, event.character)
            return
        if self.opens_a_text_field(event.key):
            self._ahead = []
            self._hand_offs += 1
            self.set_timer(self.HAND_OFF_S, partial(self._hand_back, self._hand_offs))
        # the key goes on as usual: Textual calls the base classes' handlers after this one

    def _on_blur(self, event: events.Blur) -> None:
        keys, self._ahead = self._ahead or [], None
        for key, character in keys:
            self._pass_on(key, character)

    def _hand_back(self, hand_off: int) -> None:
        """No text field took the focus: the kept keys are this widget's after all."""
        if hand_off == self._hand_offs and self._ahead is not None and self.has_focus:
            keys, self._ahead = self._ahead, None
            for key, character in keys:
                self._forward_event(events.Key(key, character))

    def _pass_on(self, key: str, character: str | None) -> None:
        focused = self.screen.focused
        if focused is not None and focused is not self:
            focused._forward_event(events.Key(key, character))


def bound_to(widget: Widget, key: str, *actions: str) -> bool:
    """Whether ``key`` runs one of ``actions`` on ``widget`` or its screen."""
    for node in (widget, widget.screen):
        for binding in node._bindings.key_to_bindings.get(key, ()):
            if binding.action in actions:
                return True
    return False
