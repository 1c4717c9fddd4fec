"""tunedeck core: project files, models, datasets, training, chat. No Textual here."""
__version__ = "0.1.0"
