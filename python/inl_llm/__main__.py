"""`python -m inl_llm train | generate | demo` (see cli.py)."""
from .cli import main

main()
