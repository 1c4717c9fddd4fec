"""Chat screen. Not built yet; for now: which model and chat template a chat would use."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll

from ..widgets.facts import Facts, NotBuilt
from .base import ProjectScreen


class ChatScreen(ProjectScreen):
    """Chat with the base model and the fine-tuned one."""

    MODE = "chat"

    def compose_body(self) -> ComposeResult:
        with VerticalScroll(classes="body"):
            yield NotBuilt("Chat", "the base model and a run's adapter side by side, answers streaming into both, "
                           "with the chat template the run trained with; merge and export.")
            yield Facts("a chat would use", id="chat-facts")

    def project_shown(self) -> None:
        project = self.session.project
        template = project["model.chat_template"]
        self.query_one("#chat-facts", Facts).show([
            ("model", project["model.source"]),
            ("chat template", "the model's own" if template == "auto" else template),
            ("system prompt", project["dataset.system_prompt"] or "(none)"),
        ])
