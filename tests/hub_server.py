""" A local stand-in for the Hugging Face Hub, for tests: real HTTP on 127.0.0.1, files on disk.

It speaks the part of the Hub API that huggingface_hub 2.x and timm use to publish and load a model repo:

    POST /api/repos/create                               create_repo (409 + url if it exists)
    POST /api/validate-yaml                              README.md front matter check before a commit
    POST /api/models/{repo}/preupload/{rev}              upload mode of each file, with the current file's oid
    POST /api/models/{repo}/commit/{rev}                 NDJSON commit: header, file (base64), deletedFile/Folder
    POST /api/models/{repo}/branch/{branch}              create_branch
    GET  /api/models/{repo}[/revision/{rev}]             model_info / repo_info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]          list_repo_tree (snapshot_download)
    HEAD|GET /{repo}/resolve/{rev}/{path}                hf_hub_download: X-Repo-Commit, ETag, Content-Length

Errors carry the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) so the client raises
its usual exceptions. Every file is a "regular" upload (base64 inside the commit): the server never answers
"lfs" and never offers Xet, so no other storage service is involved (clients should still set
``HF_HUB_DISABLE_XET=1``). Preupload returns each existing file's git blob oid, which is what lets the client
drop unchanged files and skip a no-change commit. Writes need ``Authorization: Bearer <token>``; private repos
need it for reads too.

huggingface_hub reads ``HF_ENDPOINT`` at import, so run client code in a subprocess with
``HF_ENDPOINT=hub.url``. Bounded: request bodies are capped, each connection has a socket timeout, and the
server stops itself after ``max_lifetime_s``.

    python tests/hub_server.py --root /tmp/hub        # serve until Ctrl-C (prints the URL and token)
"""
import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ['LocalHub', 'git_blob_oid']

_GITATTRIBUTES = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n'
_COMMIT_OID = re.compile(r'[0-9a-f]{40}')


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data``: what the Hub (and huggingface_hub) call a regular file's oid."""
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _now() -> str:
    return time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())


@dataclass
class _Commit:
    oid: str
    parent: Optional[str]
    files: Dict[str, str]  # path -> blob oid
    title: str
    date: str


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created: str
    commits: Dict[str, _Commit] = field(default_factory=dict)
    refs: Dict[str, str] = field(default_factory=dict)  # branch -> commit oid


class _HubError(Exception):
    """An error answer: HTTP status, message, and the Hub's X-Error-Code when the client relies on it."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[Dict] = None,
                 body: Optional[Dict] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class LocalHub:
    """A Hub stand-in serving on ``127.0.0.1`` at a free port; use as a context manager.

    State for tests to inspect: ``requests`` (method, path) in arrival order, ``commits(repo_id)``,
    ``read(repo_id, path)``, ``branches(repo_id)``, ``titles(repo_id)``, ``is_private(repo_id)``.
    """

    def __init__(
            self,
            root: os.PathLike,
            token: str = 'hf_local_test_token',
            max_lifetime_s: float = 300.,
            max_body_bytes: int = 256 << 20,
    ):
        self.root = Path(root)
        self.token = token
        self.max_lifetime_s = max_lifetime_s
        self.max_body_bytes = max_body_bytes
        self.requests: List[Tuple[str, str]] = []
        self._repos: Dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._threads: List[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, 'the server is not started'
        host, port = self._server.server_address[:2]
        return f'http://{host}:{port}'

    def start(self) -> 'LocalHub':
        (self.root / 'blobs').mkdir(parents=True, exist_ok=True)
        handler = type('Handler', (_Handler,), {'hub': self})
        self._server = ThreadingHTTPServer(('127.0.0.1', 0), handler)
        self._server.daemon_threads = True
        serve = threading.Thread(target=self._server.serve_forever, name='local-hub', daemon=True)
        serve.start()
        stopper = threading.Timer(self.max_lifetime_s, self.stop)  # never outlive a hung test
        stopper.daemon = True
        stopper.start()
        self._threads = [serve, stopper]
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if len(self._threads) == 2 and threading.current_thread() is not self._threads[1]:
            self._threads[1].cancel()

    def __enter__(self) -> 'LocalHub':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- inspection --------------------------------------------------------------------------------------

    def commits(self, repo_id: str, revision: str = 'main') -> List[str]:
        """Commit oids reachable from ``revision``, newest first."""
        with self._lock:
            repo = self._repos[repo_id]
            oid, out = self._resolve(repo, revision).oid, []
            while oid is not None:
                out.append(oid)
                oid = repo.commits[oid].parent
            return out

    def titles(self, repo_id: str, revision: str = 'main') -> List[str]:
        """The commit messages' titles of ``commits(repo_id, revision)``, newest first."""
        with self._lock:
            repo = self._repos[repo_id]
        return [repo.commits[oid].title for oid in self.commits(repo_id, revision)]

    def read(self, repo_id: str, path: str, revision: str = 'main') -> bytes:
        with self._lock:
            commit = self._resolve(self._repos[repo_id], revision)
            return self._blob_path(commit.files[path]).read_bytes()

    def files(self, repo_id: str, revision: str = 'main') -> List[str]:
        with self._lock:
            return sorted(self._resolve(self._repos[repo_id], revision).files)

    def branches(self, repo_id: str) -> Dict[str, str]:
        with self._lock:
            return dict(self._repos[repo_id].refs)

    def is_private(self, repo_id: str) -> bool:
        return self._repos[repo_id].private

    # --- storage -----------------------------------------------------------------------------------------

    def _blob_path(self, oid: str) -> Path:
        return self.root / 'blobs' / oid

    def _put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self._blob_path(oid)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.tmp.')
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
            os.replace(tmp, path)
        return oid

    def _new_commit(self, repo: _Repo, parent: Optional[str], files: Dict[str, str], title: str) -> _Commit:
        digest = json.dumps([parent, sorted(files.items()), title, len(repo.commits), repo.repo_id]).encode()
        commit = _Commit(hashlib.sha1(digest).hexdigest(), parent, files, title, _now())
        repo.commits[commit.oid] = commit
        return commit

    # --- lookups (call with the lock held) ---------------------------------------------------------------

    def _repo(self, repo_id: str, authorized: bool) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            # the Hub does not reveal private repos: unauthenticated readers get the same "not found"
            raise _HubError(404 if repo is None else 401, f'Repository not found: {repo_id}', 'RepoNotFound')
        return repo

    @staticmethod
    def _resolve(repo: _Repo, revision: str) -> _Commit:
        if revision in repo.refs:
            return repo.commits[repo.refs[revision]]
        if revision in repo.commits:
            return repo.commits[revision]
        raise _HubError(404, f'Invalid rev id: {revision}', 'RevisionNotFound')

    # --- API ---------------------------------------------------------------------------------------------

    def create_repo(self, body: dict, authorized: bool, base: str) -> dict:
        self._require(authorized)
        if body.get('type', 'model') != 'model':
            raise _HubError(400, 'This stand-in only hosts model repos.')
        name, org = body.get('name'), body.get('organization')
        if not name or not org or '/' in name:
            raise _HubError(400, "Expected 'name' and 'organization' (repo ids are ORG/NAME here).")
        repo_id = f'{org}/{name}'
        with self._lock:
            if repo_id in self._repos:
                raise _HubError(409, 'You already created this model repo', body={'url': f'{base}/{repo_id}'})
            private = body.get('visibility', 'private' if body.get('private') else 'public') == 'private'
            repo = _Repo(repo_id, private, _now())
            initial = self._new_commit(repo, None, {'.gitattributes': self._put_blob(_GITATTRIBUTES)},
                                       'initial commit')
            repo.refs['main'] = initial.oid
            self._repos[repo_id] = repo
        return {'url': f'{base}/{repo_id}', 'name': repo_id, 'id': repo_id}

    @staticmethod
    def validate_yaml(body: dict) -> dict:
        import yaml
        content = body.get('content', '')
        match = re.match(r'---\r?\n(.*?)\r?\n---\s*(\n|$)', content, re.S)
        if match is None:
            return {'errors': [], 'warnings': [{'message': 'empty or missing yaml metadata in repo card'}]}
        try:
            meta = yaml.safe_load(match.group(1))
        except yaml.YAMLError as e:
            raise _HubError(400, 'Invalid YAML', body={'errors': [{'message': f'Invalid YAML: {e}'}]})
        if not isinstance(meta, dict):
            raise _HubError(400, 'Invalid YAML', body={'errors': [{'message': 'metadata must be a mapping'}]})
        return {'errors': [], 'warnings': []}

    def preupload(self, repo_id: str, revision: str, body: dict, authorized: bool) -> dict:
        self._require(authorized)
        with self._lock:
            commit = self._resolve(self._repo(repo_id, authorized), revision)
            files = [
                # 'regular' for every file: content travels in the commit itself (no LFS, no Xet)
                dict(path=f['path'], uploadMode='regular', shouldIgnore=False, oid=commit.files.get(f['path']))
                for f in body.get('files', [])
            ]
        return {'files': files, 'commitOid': commit.oid}

    def commit(self, repo_id: str, branch: str, lines: List[dict], query: dict, authorized: bool,
               base: str) -> dict:
        self._require(authorized)
        if query.get('create_pr'):
            raise _HubError(400, 'Pull requests are not supported by this stand-in.')
        if not lines or lines[0].get('key') != 'header':
            raise _HubError(400, 'The first NDJSON line of a commit must be its header.')
        header = lines[0]['value']
        with self._lock:
            repo = self._repo(repo_id, authorized)
            if branch not in repo.refs:
                raise _HubError(404, f'Invalid rev id: {branch} (commits go to a branch)', 'RevisionNotFound')
            head = repo.commits[repo.refs[branch]]
            if header.get('parentCommit') and header['parentCommit'] != head.oid:
                raise _HubError(412, f'Parent commit {header["parentCommit"]} is not the head of {branch}')
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get('key'), line.get('value', {})
                if key == 'file':
                    if value.get('encoding') != 'base64':
                        raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    files[value['path']] = self._put_blob(base64.b64decode(value['content']))
                elif key == 'deletedFile':
                    if files.pop(value['path'], None) is None:
                        raise _HubError(404, "A file with this name doesn't exist", 'EntryNotFound')
                elif key == 'deletedFolder':
                    prefix = value['path'].rstrip('/') + '/'
                    files = {p: o for p, o in files.items() if not p.startswith(prefix)}
                elif key == 'lfsFile':
                    raise _HubError(400, 'LFS was never offered: every file must be a regular upload.')
                else:
                    raise _HubError(400, f'Unknown commit operation {key!r}')
            # like the Hub, a commit is made even when nothing changed: skipping it is the client's job
            new = self._new_commit(repo, head.oid, files, header.get('summary', ''))
            repo.refs[branch] = new.oid
        return {'success': True, 'commitOid': new.oid, 'commitUrl': f'{base}/{repo_id}/commit/{new.oid}',
                'pullRequestUrl': None}

    def create_branch(self, repo_id: str, branch: str, body: dict, authorized: bool) -> dict:
        self._require(authorized)
        with self._lock:
            repo = self._repo(repo_id, authorized)
            if branch in repo.refs:
                raise _HubError(409, 'Reference already exists')
            repo.refs[branch] = self._resolve(repo, body.get('startingPoint') or 'main').oid
        return {}

    def model_info(self, repo_id: str, revision: Optional[str], authorized: bool) -> dict:
        with self._lock:
            repo = self._repo(repo_id, authorized)
            commit = self._resolve(repo, revision or 'main')
            return dict(_id=repo_id, id=repo_id, modelId=repo_id, author=repo_id.split('/')[0], sha=commit.oid,
                        private=repo.private, disabled=False, gated=False, lastModified=commit.date,
                        createdAt=repo.created, tags=[], siblings=[{'rfilename': p} for p in sorted(commit.files)])

    def tree(self, repo_id: str, revision: str, path: str, recursive: bool, authorized: bool) -> list:
        with self._lock:
            commit = self._resolve(self._repo(repo_id, authorized), revision)
            prefix = path.strip('/') + '/' if path.strip('/') else ''
            out, folders = [], set()
            for p, oid in sorted(commit.files.items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix):]
                if not recursive and '/' in rest:
                    folders.add(prefix + rest.split('/', 1)[0])
                    continue
                out.append(dict(type='file', oid=oid, size=self._blob_path(oid).stat().st_size, path=p))
            out += [dict(type='directory', oid=hashlib.sha1(f.encode()).hexdigest(), size=0, path=f)
                    for f in sorted(folders)]
            if prefix and not out:
                raise _HubError(404, f'{path} does not exist on {revision}', 'EntryNotFound')
            return out

    def resolve(self, repo_id: str, revision: str, path: str, authorized: bool) -> Tuple[_Commit, Path]:
        with self._lock:
            commit = self._resolve(self._repo(repo_id, authorized), revision)
            if path not in commit.files:
                # X-Repo-Commit lets the client cache the file's absence for this commit
                raise _HubError(404, 'Entry not found', 'EntryNotFound', headers={'X-Repo-Commit': commit.oid})
            return commit, self._blob_path(commit.files[path])

    @staticmethod
    def _require(authorized: bool) -> None:
        if not authorized:
            raise _HubError(401, 'Invalid credentials in Authorization header')


_REPO = r'(?P<repo>[^/]+/[^/]+)'
_ROUTES = [
    ('POST', re.compile(r'/api/repos/create'), 'create_repo'),
    ('POST', re.compile(r'/api/validate-yaml'), 'validate_yaml'),
    ('POST', re.compile(rf'/api/models/{_REPO}/preupload/(?P<rev>[^/]+)'), 'preupload'),
    ('POST', re.compile(rf'/api/models/{_REPO}/commit/(?P<rev>[^/]+)'), 'commit'),
    ('POST', re.compile(rf'/api/models/{_REPO}/branch/(?P<rev>[^/]+)'), 'create_branch'),
    ('GET', re.compile(rf'/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?'), 'tree'),
    ('GET', re.compile(rf'/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?'), 'model_info'),
    ('GET', re.compile(rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)'), 'resolve'),
    ('HEAD', re.compile(rf'/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)'), 'resolve'),
]


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    timeout = 30  # socket timeout: a stalled client cannot hold a thread forever
    server_version = 'LocalHub/1.0'

    def log_message(self, format, *args):  # quiet: tests read hub.requests instead
        pass

    def do_GET(self):
        self._dispatch('GET')

    def do_HEAD(self):
        self._dispatch('HEAD')

    def do_POST(self):
        self._dispatch('POST')

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        with hub._lock:
            hub.requests.append((method, url.path))
        try:
            for m, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path) if m == method else None
                if match:
                    # segments are matched still quoted, so a quoted '/' in a revision stays in its segment
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    return self._handle(method, name, groups, parse_qs(url.query))
            raise _HubError(404, f'No route for {method} {url.path} in this Hub stand-in')
        except _HubError as e:
            self._send_error(e)

    def _handle(self, method: str, name: str, g: dict, query: dict) -> None:
        hub, base = self.hub, self.hub.url
        authorized = self.headers.get('Authorization', '') == f'Bearer {hub.token}'
        if name == 'resolve':
            commit, path = hub.resolve(g['repo'], g['rev'], g['path'], authorized)
            data = path.read_bytes()
            headers = {'X-Repo-Commit': commit.oid, 'ETag': f'"{path.name}"', 'Content-Type': 'application/octet-stream'}
            return self._send(200, data, headers, head_only=method == 'HEAD')
        if name == 'model_info':
            return self._send(200, hub.model_info(g['repo'], g['rev'], authorized))
        if name == 'tree':
            recursive = query.get('recursive', ['False'])[0].lower() in ('1', 'true')
            return self._send(200, hub.tree(g['repo'], g['rev'], g['path'] or '', recursive, authorized))
        body = self._read_body()
        if name == 'commit':
            try:
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise _HubError(400, f'Malformed NDJSON commit payload: {e}')
            q = {k: v[0] for k, v in query.items()}
            return self._send(200, hub.commit(g['repo'], g['rev'], lines, q, authorized, base))
        try:
            payload = json.loads(body or b'{}')
        except json.JSONDecodeError as e:
            raise _HubError(400, f'Malformed JSON body: {e}')
        if name == 'create_repo':
            return self._send(200, hub.create_repo(payload, authorized, base))
        if name == 'validate_yaml':
            return self._send(200, hub.validate_yaml(payload))
        if name == 'preupload':
            return self._send(200, hub.preupload(g['repo'], g['rev'], payload, authorized))
        if name == 'create_branch':
            return self._send(200, hub.create_branch(g['repo'], g['rev'], payload, authorized))
        raise _HubError(404, f'Unhandled route {name}')

    def _read_body(self) -> bytes:
        length = self.headers.get('Content-Length')
        if length is None:
            raise _HubError(411, 'Content-Length required')
        if int(length) > self.hub.max_body_bytes:
            raise _HubError(413, f'Request body over {self.hub.max_body_bytes} bytes')
        return self.rfile.read(int(length))

    def _send(self, status: int, body, headers: Optional[Dict[str, str]] = None, head_only: bool = False) -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            headers = {'Content-Type': 'application/json', **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _send_error(self, e: _HubError) -> None:
        headers = {'X-Error-Message': e.message, **e.headers}
        if e.code:
            headers['X-Error-Code'] = e.code
        body = {'error': e.message, **e.body}
        self._send(e.status, body, headers, head_only=self.command == 'HEAD')


def _main() -> None:
    import argparse
    p = argparse.ArgumentParser(description='Serve a local stand-in for the Hugging Face Hub.')
    p.add_argument('--root', default=None, help='storage folder (default: a temporary one, removed on exit)')
    p.add_argument('--token', default='hf_local_test_token')
    p.add_argument('--lifetime', type=float, default=3600., help='seconds before the server stops itself')
    args = p.parse_args()
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix='local_hub_'))
    with LocalHub(root, token=args.token, max_lifetime_s=args.lifetime) as hub:
        print(f'HF_ENDPOINT={hub.url} HF_TOKEN={hub.token} HF_HUB_DISABLE_XET=1   (files in {root})', flush=True)
        try:
            while hub._server is not None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    _main()
