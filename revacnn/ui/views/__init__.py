"""Views shared by the live and replay apps."""
