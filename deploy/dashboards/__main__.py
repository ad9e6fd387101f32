from deploy.dashboards.ditserve import render

for written in render():
    print(written)
