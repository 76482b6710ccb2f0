"""Command-line entry points (thin ``main(argv) -> int`` functions)."""
