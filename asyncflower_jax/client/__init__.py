"""Client-side computation: local training of one client, and many clients batched with vmap."""
