"""`turbo-batch run`: the batch pipeline, one module per stage of the data path.

plan     preflight checks before Ray starts → Plan                 plan.py
read     input files → blocks with a stable row_id                 read.py   (Ray Data, CPU)
order    rows that share a prompt prefix grouped                   order.py  (Ray Data, CPU)
render   rows → token ids (sandboxed Jinja, chat template)         render.py (Ray Data, CPU)
engine   engine actors or a Serve app's engines, as Slots          pool.py
dispatch rows → engines, lost engines, poison rows                 driver.py
collect  results → parts (schema, buffering)                       results.py
write    parts committed exactly once, manifest, _SUCCESS           write.py
report   summary, evaluation                                       report.py
run      the above wired together: run_job()                       run.py
"""
