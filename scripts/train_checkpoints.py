#!/usr/bin/env python
"""placeholder: being written"""
