"""Gradio tabs. They call the pdmd library; the library never imports this package."""
