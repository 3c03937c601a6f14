"""Starts olah, a Hub-API-compatible server, for tests/test_hub_roundtrip.py. Run it with the Python of olah's own
environment (`.venv-olah/bin/python tests/olah_local_hub.py -c olah.toml`); it takes olah's command-line arguments.

One correction to olah 0.5.4: for a file missing from a repository it serves from a local git mirror, olah answers a
HEAD request with 401 RepoNotFound. The Hub answers 404 EntryNotFound, which is what clients rely on when they probe
optional files (transformers' image processor loading probes `processor_config.json` before
`preprocessor_config.json`). The wrapper below gives that answer; everything else is olah unchanged.
"""

import olah.server
import olah.server_file_routes
from olah.errors import error_entry_not_found
from olah.server_access import build_repo_ref
from olah.server_mirror import has_local_mirror

olah_file_head = olah.server_file_routes.file_head_common


async def file_head_with_entry_not_found(app, repo_type, org, repo, commit, file_path, request):
    response = await olah_file_head(app, repo_type, org, repo, commit, file_path, request)
    if response.status_code == 401 and has_local_mirror(app, build_repo_ref(repo_type, org, repo)):
        return error_entry_not_found()
    return response


olah.server_file_routes.file_head_common = file_head_with_entry_not_found

if __name__ == "__main__":
    olah.server.main()
