"""Built-in plugins, written exactly as a third-party plugin would be.

``BUILTIN_PLUGINS`` lists the modules the plugin manager loads before any
installed package's entry points.
"""

BUILTIN_PLUGINS: tuple[str, ...] = (
    "adapterdeck.plugins.chat",
    "adapterdeck.plugins.alpaca",
    "adapterdeck.plugins.preference",
    "adapterdeck.plugins.evaluators",
    "adapterdeck.plugins.general",
    "adapterdeck.plugins.lora",
    "adapterdeck.plugins.objectives",
    "adapterdeck.plugins.prefix",
    "adapterdeck.plugins.trackers",
)
