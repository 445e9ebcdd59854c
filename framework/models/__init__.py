"""Model definitions, weight loading and tokenizers for the LLM engine."""
