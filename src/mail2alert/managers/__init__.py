"""Manager plugins: the contracts (:mod:`.base`), the generic ``mail`` manager, the registry."""
