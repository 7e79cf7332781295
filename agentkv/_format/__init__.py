"""llama.cpp's sequence-state bytes: parsing, shapes, pieces and the restore layout.

Pure functions over bytes (nothing here touches a context or a file), so each can be fuzzed
on its own. The layer below everything else: the store and the engine speak its types.
"""
