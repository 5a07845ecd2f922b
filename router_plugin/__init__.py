"""What runs beside the SGLang router: the tap and the wire format of its events.

Depends on aiohttp and pyzmq only (enforced by import-linter): never on the controller.
"""
