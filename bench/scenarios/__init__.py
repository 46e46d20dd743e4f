"""One module per benchmark scenario, each with ``async def run(context)``."""
