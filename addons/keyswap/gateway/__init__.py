"""The gateway: its options and live config (settings), the config compiled for serving
(runtime, routes, rate limits, header plans), and the pipeline that runs the stages."""
