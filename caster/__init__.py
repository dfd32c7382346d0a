"""caster: cache-aware streaming speech recognition."""
