"""The options every nfmig module shares: how it authenticates to the NF instances and
checks who they are."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  user:
    description:
      - The user to log in as on every NF instance whose endpoint URL names none.
      - When left out, the action plugin takes the host's C(ansible_user) (or
        C(ansible_ssh_user)); without either, the user the module runs as.
    type: str
  password:
    description:
      - The password for every NF instance.
      - When left out, the action plugin takes the host's C(ansible_password) (or
        C(ansible_ssh_pass)); without either, the E(NFMIG_PASSWORD) environment variable
        of the module's process, else SSH keys (O(private_key_file), the agent, the usual
        key files).
    type: str
  private_key_file:
    description:
      - SSH private key file to log in with when no password is given.
      - When left out, the action plugin takes the host's
        C(ansible_ssh_private_key_file) (or C(ansible_private_key_file)).
    type: path
  known_hosts:
    description:
      - Known-hosts file the NETCONF servers' host keys are checked against; it is the
        whole truth (no other file is read).
      - When left out, the action plugin takes the host's C(nfmig_known_hosts) variable;
        without it, C(~/.ssh/known_hosts) of the user the module runs as.
    type: path
  host_key_checking:
    description:
      - Check the NETCONF servers' host keys against O(known_hosts) and the RESTCONF
        servers' certificates against O(ca_file).
      - When left out, the action plugin takes the host's C(ansible_host_key_checking)
        (or C(ansible_ssh_host_key_checking)) variable, else Ansible's own
        C(host_key_checking) setting (E(ANSIBLE_HOST_KEY_CHECKING)).
      - V(false) is for tests only; anyone in the middle could read and change the
        sessions.
    type: bool
    default: true
  ca_file:
    description:
      - CA certificates the C(restconf://) servers' certificates are checked against
        (default, the system's).
    type: path
  timeout:
    description:
      - Longest wait, in seconds, for one NETCONF or RESTCONF reply.
    type: int
    default: 600
  connect_timeout:
    description:
      - Longest wait, in seconds, to connect and log in to one NF instance.
    type: int
    default: 30
notes:
  - >-
    The module runs where the task is delegated to, normally the controller
    (C(delegate_to: localhost) or C(connection: local)), with an
    C(ansible_python_interpreter) that has the C(nfmig) Python package installed.
  - Credentials are taken from the inventory host the task runs for, not from the host it
    is delegated to, so one inventory host can stand for one NF instance.
requirements:
  - the C(nfmig) Python package, in the Python that runs the module
"""
