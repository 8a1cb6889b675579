"""Beyond one machine: batch upscaling (`ray_upscale`) and metric workers (`ray_eval`) on Ray.

Nothing here is imported unless `--ray` is given; Ray comes with the `[ray]` extra."""
