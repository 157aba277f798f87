"""The Gradio demo: RATE next to a Decision Transformer, and a look inside the memory."""
