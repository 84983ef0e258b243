"""OpenAI-exact request and response models, named like the SDK's types.

This package imports nothing from the rest of the app.
"""
